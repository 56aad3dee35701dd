// What the phone keeps across reloads, in IndexedDB (one key-value object store): its
// registration (id, token, Ed25519 key), the error-feedback residual, an upload waiting to be
// retried, its privacy ledger, the last model and the digits the user drew. Values are
// structured-cloned, so typed arrays, Uint8Array bodies and CryptoKeys are stored as they are.

const STORE = "kv";

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

export class PhoneStore {
  /** `name`: the database; one per phone identity (tabs of one browser profile share it). */
  static async open(name = "fedfleet-phone") {
    const req = indexedDB.open(name, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    return new PhoneStore(await request(req));
  }

  constructor(db) {
    this.db = db;
  }

  async get(key) {
    return request(this.db.transaction(STORE).objectStore(STORE).get(key));
  }

  async set(key, value) {
    const tx = this.db.transaction(STORE, "readwrite");
    tx.objectStore(STORE).put(value, key);
    await new Promise((resolve, reject) => {
      tx.oncomplete = resolve;
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  }

  async delete(key) {
    const tx = this.db.transaction(STORE, "readwrite");
    tx.objectStore(STORE).delete(key);
    await new Promise((resolve, reject) => {
      tx.oncomplete = resolve;
      tx.onerror = () => reject(tx.error);
    });
  }
}
