//! The Merkle tree of a batch-signed set of tokens (API.md, "Tokens"), as RFC 9162 §2.1
//! defines it: a leaf hashes `0x00 ‖ data`, a node `0x01 ‖ left ‖ right`, and a tree of
//! `n > 1` leaves splits at the largest power of two below `n`.
//!
//! Here a leaf's data is `tree_id ‖ salt ‖ payload`, and the batch's one signature covers
//! [`root_message`]: the tree id and size are signed with the root, so a proof cannot be
//! moved to another tree nor claim another size.

use ring::digest::{Context, SHA256};

pub type Hash = [u8; 32];

/// Bytes in a tree id and in a leaf's salt.
pub const ID_LEN: usize = 16;

/// What the batch signature covers.
pub const ROOT_CONTEXT: &[u8] = b"rpw-batch-root-v1";

pub fn leaf_hash(tree_id: &[u8], salt: &[u8], payload: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x00]);
    ctx.update(tree_id);
    ctx.update(salt);
    ctx.update(payload);
    finish(ctx)
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x01]);
    ctx.update(left);
    ctx.update(right);
    finish(ctx)
}

fn finish(ctx: Context) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// `"rpw-batch-root-v1" ‖ 0x00 ‖ tree_id ‖ size (u32 big-endian) ‖ root`.
pub fn root_message(tree_id: &[u8], size: u32, root: &Hash) -> Vec<u8> {
    let mut msg = Vec::with_capacity(ROOT_CONTEXT.len() + 1 + tree_id.len() + 4 + 32);
    msg.extend_from_slice(ROOT_CONTEXT);
    msg.push(0x00);
    msg.extend_from_slice(tree_id);
    msg.extend_from_slice(&size.to_be_bytes());
    msg.extend_from_slice(root);
    msg
}

/// The root of `leaves` and every leaf's inclusion path (sibling hashes, leaf level
/// first), in leaf order. `leaves` must not be empty.
pub fn build(leaves: &[Hash]) -> (Hash, Vec<Vec<Hash>>) {
    assert!(!leaves.is_empty(), "a tree has at least one leaf");
    let mut paths: Vec<Vec<Hash>> = vec![Vec::new(); leaves.len()];
    let root = subtree(leaves, &mut paths);
    (root, paths)
}

/// MTH(D[n]) of RFC 9162, appending to each leaf's path the sibling met on the way up.
fn subtree(leaves: &[Hash], paths: &mut [Vec<Hash>]) -> Hash {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let k = split(leaves.len());
    let (left_paths, right_paths) = paths.split_at_mut(k);
    let left = subtree(&leaves[..k], left_paths);
    let right = subtree(&leaves[k..], right_paths);
    for path in left_paths.iter_mut() {
        path.push(right);
    }
    for path in right_paths.iter_mut() {
        path.push(left);
    }
    node_hash(&left, &right)
}

/// The largest power of two below `n` (n > 1).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The root an inclusion proof leads to (RFC 9162 §2.1.3.2), or `None` when the proof
/// cannot belong to a tree of `size` leaves (index out of range, a path too long or too
/// short).
pub fn root_from_proof(leaf: Hash, index: u32, size: u32, path: &[Hash]) -> Option<Hash> {
    if index >= size {
        return None;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = leaf;
    for p in path {
        if s_n == 0 {
            return None;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    (s_n == 0).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(&[7; ID_LEN], &[i as u8; ID_LEN], format!("t{i}").as_bytes()))
            .collect()
    }

    /// RFC 9162's MTH written the plain recursive way, to check `build` against.
    fn mth(leaves: &[Hash]) -> Hash {
        if leaves.len() == 1 {
            return leaves[0];
        }
        let k = split(leaves.len());
        node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
    }

    #[test]
    fn every_leaf_of_every_size_proves_the_root() {
        for n in 1..=70usize {
            let l = leaves(n);
            let (root, paths) = build(&l);
            assert_eq!(root, mth(&l), "size {n}");
            for (i, path) in paths.iter().enumerate() {
                assert_eq!(
                    root_from_proof(l[i], i as u32, n as u32, path),
                    Some(root),
                    "leaf {i} of {n}"
                );
            }
        }
    }

    #[test]
    fn a_proof_fails_at_another_place_or_leaf() {
        let l = leaves(13);
        let (root, paths) = build(&l);
        let path = &paths[5];
        assert_ne!(root_from_proof(l[5], 4, 13, path), Some(root));
        // Another size can lead to the same root (13 and 14 leaves split alike above
        // leaf 5): that is why the size is signed with the root (`root_message`).
        assert_eq!(root_from_proof(l[5], 5, 14, path), Some(root));
        assert_ne!(
            root_message(&[7; ID_LEN], 13, &root),
            root_message(&[7; ID_LEN], 14, &root)
        );
        assert_ne!(root_from_proof(l[6], 5, 13, path), Some(root));
        assert_eq!(root_from_proof(l[5], 13, 13, path), None);
        assert_eq!(root_from_proof(l[5], 5, 13, &path[..path.len() - 1]), None);
        let mut longer = path.clone();
        longer.push(l[0]);
        assert_eq!(root_from_proof(l[5], 5, 13, &longer), None);
        let mut bent = path.clone();
        bent[1][0] ^= 1;
        assert_ne!(root_from_proof(l[5], 5, 13, &bent), Some(root));
    }
}
