package org.fedfleet.secagg;

import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.KeyFactory;
import java.security.PrivateKey;
import java.security.PublicKey;
import java.security.spec.NamedParameterSpec;
import java.security.spec.XECPrivateKeySpec;
import java.security.spec.XECPublicKeySpec;
import javax.crypto.Cipher;
import javax.crypto.KeyAgreement;
import javax.crypto.Mac;
import javax.crypto.spec.ChaCha20ParameterSpec;
import javax.crypto.spec.IvParameterSpec;
import javax.crypto.spec.SecretKeySpec;

/**
 * The primitives of secure aggregation (FORMAT.md section 12.2) from the JDK alone: X25519
 * ({@code XDH}), HKDF-SHA256 over {@code HmacSHA256}, the ChaCha20 mask stream and the
 * ChaCha20-Poly1305 share channel. Byte for byte what PyNaCl (libsodium) and cryptography give.
 */
public final class SecAggCrypto {
  private static final byte[] LABEL = "fedfleet-secagg-v1 ".getBytes(StandardCharsets.UTF_8);
  private static final byte[] BASE_POINT = basePoint();

  private SecAggCrypto() {}

  private static byte[] basePoint() {
    byte[] u = new byte[32];
    u[0] = 9;
    return u;
  }

  /** HKDF-SHA256 (RFC 5869), empty salt, info = label prefix || label || 0x00 || context. */
  public static byte[] hkdf(byte[] secret, String label, byte[] context, int length) {
    try {
      Mac mac = Mac.getInstance("HmacSHA256");
      mac.init(new SecretKeySpec(new byte[32], "HmacSHA256"));
      byte[] prk = mac.doFinal(secret);
      mac.init(new SecretKeySpec(prk, "HmacSHA256"));
      byte[] labelBytes = label.getBytes(StandardCharsets.UTF_8);
      byte[] info = ByteBuffer.allocate(LABEL.length + labelBytes.length + 1 + context.length)
          .put(LABEL).put(labelBytes).put((byte) 0).put(context).array();
      byte[] out = new byte[length];
      byte[] block = new byte[0];
      for (int done = 0, i = 1; done < length; i++) {
        mac.update(block);
        mac.update(info);
        mac.update((byte) i);
        block = mac.doFinal();
        int n = Math.min(block.length, length - done);
        System.arraycopy(block, 0, out, done, n);
        done += n;
      }
      return out;
    } catch (GeneralSecurityException e) {
      throw new IllegalStateException("HmacSHA256 is part of every JDK", e);
    }
  }

  public static byte[] hkdf(byte[] secret, String label, byte[] context) {
    return hkdf(secret, label, context, 32);
  }

  /** X25519(secret, peer): the raw 32-byte shared secret (RFC 7748). */
  public static byte[] x25519(byte[] secret, byte[] peerPublic) {
    try {
      KeyFactory kf = KeyFactory.getInstance("XDH");
      PrivateKey sk = kf.generatePrivate(new XECPrivateKeySpec(NamedParameterSpec.X25519, secret.clone()));
      byte[] le = peerPublic.clone();
      le[31] &= 0x7f;  // RFC 7748: the top bit of a u-coordinate is ignored
      byte[] be = new byte[32];
      for (int i = 0; i < 32; i++) {
        be[i] = le[31 - i];
      }
      PublicKey pk = kf.generatePublic(new XECPublicKeySpec(NamedParameterSpec.X25519, new BigInteger(1, be)));
      KeyAgreement ka = KeyAgreement.getInstance("XDH");
      ka.init(sk);
      ka.doPhase(pk, true);
      return ka.generateSecret();
    } catch (GeneralSecurityException e) {
      throw new IllegalArgumentException("unusable X25519 key: " + e.getMessage(), e);
    }
  }

  public static byte[] publicKey(byte[] secret) {
    return x25519(secret, BASE_POINT);
  }

  /** The first {@code count} little-endian words of ChaCha20(key, nonce 0, counter 0), mod 2^bits. */
  public static long[] mask(byte[] key, int count, int bits) {
    try {
      Cipher c = Cipher.getInstance("ChaCha20");
      c.init(Cipher.ENCRYPT_MODE, new SecretKeySpec(key, "ChaCha20"), new ChaCha20ParameterSpec(new byte[12], 0));
      byte[] stream = c.doFinal(new byte[8 * count]);
      ByteBuffer buf = ByteBuffer.wrap(stream).order(ByteOrder.LITTLE_ENDIAN);
      long keep = bits >= 64 ? -1L : (1L << bits) - 1;
      long[] out = new long[count];
      for (int i = 0; i < count; i++) {
        out[i] = buf.getLong() & keep;
      }
      return out;
    } catch (GeneralSecurityException e) {
      throw new IllegalStateException("ChaCha20 is part of JDK 11+", e);
    }
  }

  private static byte[] ident(byte[] context, int sender, int recipient) {
    return ByteBuffer.allocate(context.length + 9).put(context).put((byte) 0).putInt(sender).putInt(recipient).array();
  }

  private static Cipher channel(int mode, byte[] ownSecret, byte[] peerPublic, byte[] context, int sender,
      int recipient) throws GeneralSecurityException {
    byte[] ident = ident(context, sender, recipient);
    byte[] key = hkdf(x25519(ownSecret, peerPublic), "share channel", ident);
    Cipher c = Cipher.getInstance("ChaCha20-Poly1305");
    c.init(mode, new SecretKeySpec(key, "ChaCha20"), new IvParameterSpec(new byte[12]));
    c.updateAAD(ident);
    return c;
  }

  public static byte[] seal(byte[] ownSecret, byte[] peerPublic, byte[] context, int sender, int recipient,
      byte[] plain) {
    try {
      return channel(Cipher.ENCRYPT_MODE, ownSecret, peerPublic, context, sender, recipient).doFinal(plain);
    } catch (GeneralSecurityException e) {
      throw new IllegalStateException(e);
    }
  }

  public static byte[] open(byte[] ownSecret, byte[] peerPublic, byte[] context, int sender, int recipient,
      byte[] sealed) {
    try {
      return channel(Cipher.DECRYPT_MODE, ownSecret, peerPublic, context, sender, recipient).doFinal(sealed);
    } catch (GeneralSecurityException e) {
      throw new IllegalArgumentException("the share from phone " + sender + " does not decrypt", e);
    }
  }
}
