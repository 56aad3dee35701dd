// Signed uploads with WebCrypto Ed25519 (protocol/signing.py): a phone that enrols a public key
// signs every upload over
//   "fedfleet-v1\n{phone}\n{base_version}\n{update_id}\n{sha256(body) hex}\n{nonce}"
// sent as X-Fedfleet-Signature (base64) and X-Fedfleet-Nonce (ms clock, strictly increasing).
// The private key is generated non-extractable and kept in IndexedDB as a CryptoKey.

const b64 = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes)));
const hexOf = (bytes) => [...new Uint8Array(bytes)].map((b) => b.toString(16).padStart(2, "0")).join("");

/** A new key pair, or null where the browser has no Ed25519 (the phone then enrols unsigned). */
export async function newSigningKey() {
  try {
    return await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
  } catch {
    return null;
  }
}

export async function publicKeyB64(keyPair) {
  return b64(await crypto.subtle.exportKey("raw", keyPair.publicKey));
}

export class Signer {
  constructor(keyPair) {
    this.keyPair = keyPair;
    this.last = 0;
  }

  /** The two headers of one signed upload. */
  async headers(phone, baseVersion, updateId, body) {
    const nonce = Math.max(Date.now(), this.last + 1);
    this.last = nonce;
    const digest = hexOf(await crypto.subtle.digest("SHA-256", body));
    const text = `fedfleet-v1\n${phone}\n${baseVersion}\n${updateId}\n${digest}\n${nonce}`;
    const sig = await crypto.subtle.sign({ name: "Ed25519" }, this.keyPair.privateKey, new TextEncoder().encode(text));
    return { "X-Fedfleet-Signature": b64(sig), "X-Fedfleet-Nonce": String(nonce) };
  }
}
