#!/usr/bin/env python3
"""Verifies redpacket-wallet award tokens offline, from API.md ("Tokens") alone.

A token is an encoded SignedToken (protobuf), base64url without padding:
  payload = 1 (bytes: the encoded RedPacketToken), signature = 2 (bytes),
  key_id = 3 (string), batch = 4 (BatchProof, optional):
  BatchProof: tree_id = 1 (16 bytes), size = 2, index = 3, salt = 4 (16 bytes),
              path = 5 (32*k bytes, the sibling hashes, leaf level first)

Without `batch` the Ed25519 signature covers `payload`. With it, the signature covers
  "rpw-batch-root-v1" || 0x00 || tree_id || size (u32 big-endian) || root
where root is recomputed (RFC 9162 section 2.1.3.2) from
  leaf = SHA-256(0x00 || tree_id || salt || payload), node = SHA-256(0x01 || left || right).

Usage:
  verify_token.py VECTORS.json          check every vector's expected outcome
  verify_token.py KEYS.json TOKEN ...   verify tokens with the keys GET /v1/keys returned

Needs Python 3 and the `cryptography` package (Debian: python3-cryptography).
"""

import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def b64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def fields(data):
    """Decodes one protobuf message into {field number: [values]} (varints as ints,
    length-delimited fields as bytes). Other wire types are refused."""
    out, i = {}, 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            if i >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            length = varint()
            if i + length > len(data):
                raise ValueError("truncated field")
            value, i = data[i:i + length], i + length
        else:
            raise ValueError("unexpected wire type %d" % wire)
        out.setdefault(number, []).append(value)
    return out


def last(msg, number, default):
    return msg.get(number, [default])[-1]


def node(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_proof(leaf, index, size, path):
    """RFC 9162 section 2.1.3.2: the root an inclusion proof leads to, or None."""
    if index >= size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def signed_message(token):
    """What the token's signature must cover, or None when its proof is malformed."""
    payload = last(token, 1, b"")
    if 4 not in token:
        return payload
    proof = fields(last(token, 4, b""))
    tree_id, salt, path = last(proof, 1, b""), last(proof, 4, b""), last(proof, 5, b"")
    size, index = last(proof, 2, 0), last(proof, 3, 0)
    if len(tree_id) != 16 or len(salt) != 16 or len(path) % 32 or size >= 2**32:
        return None
    leaf = hashlib.sha256(b"\x00" + tree_id + salt + payload).digest()
    hashes = [path[i:i + 32] for i in range(0, len(path), 32)]
    root = root_from_proof(leaf, index, size, hashes)
    if root is None:
        return None
    return b"rpw-batch-root-v1\x00" + tree_id + size.to_bytes(4, "big") + root


def verify(keys, text):
    """(True, payload fields) when the token verifies with a listed key, else (False, why)."""
    try:
        token = fields(b64url(text))
        key_id = last(token, 3, b"").decode()
        if key_id not in keys:
            return False, "key %r is not listed" % key_id
        message = signed_message(token)
        if message is None:
            return False, "the batch proof cannot belong to its tree"
        keys[key_id].verify(last(token, 2, b""), message)
        return True, fields(last(token, 1, b""))
    except InvalidSignature:
        return False, "bad signature"
    except (ValueError, UnicodeDecodeError) as err:
        return False, "not a token: %s" % err


def load_keys(listing):
    return {
        k["key_id"]: Ed25519PublicKey.from_public_bytes(b64url(k["public_key"]))
        for k in listing["keys"]
    }


def check_vectors(path):
    with open(path) as f:
        doc = json.load(f)
    keys = load_keys(doc)
    failures = 0
    for v in doc["vectors"]:
        ok, detail = verify(keys, v["token"])
        if ok:
            user, amount = last(detail, 2, 0), last(detail, 5, 0)
            if (user, amount) != (v["user_id"], v["amount_cents"]):
                ok, detail = False, "payload fields differ from the vector's"
        good = ok == v["valid"]
        failures += not good
        print("%s  %-45s %s" % ("ok  " if good else "FAIL", v["name"],
                                "valid" if ok else "refused: %s" % detail))
    print("%d vectors, %d failed" % (len(doc["vectors"]), failures))
    return failures == 0


def main(argv):
    if len(argv) == 2:
        return 0 if check_vectors(argv[1]) else 1
    if len(argv) >= 3:
        with open(argv[1]) as f:
            keys = load_keys(json.load(f))
        bad = 0
        for text in argv[2:]:
            ok, detail = verify(keys, text)
            bad += not ok
            if ok:
                print("valid: user %d, %d cents, %s" % (
                    last(detail, 2, 0), last(detail, 5, 0), last(detail, 6, b"").decode()))
            else:
                print("refused: %s" % detail)
        return 1 if bad else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
