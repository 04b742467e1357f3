//! The double-average split: the next share of a packet with `remaining_cents` left in
//! `remaining_shares` shares is drawn uniformly from 1 cent to twice the remaining mean
//! (and never so much that a later share could get less than a cent); the last share
//! takes what is left. Shares therefore sum to the total exactly, each is at least one
//! cent, and the expected share is the mean whatever the order of opening.

use rand::Rng;

/// Why a share cannot be drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("no share is left")]
    NoShareLeft,
    #[error("fewer cents than shares are left")]
    TooFewCents,
}

/// The largest share the rule allows now.
pub fn max_share(remaining_cents: i64, remaining_shares: i64) -> Result<i64, SplitError> {
    if remaining_shares < 1 {
        return Err(SplitError::NoShareLeft);
    }
    if remaining_cents < remaining_shares {
        return Err(SplitError::TooFewCents);
    }
    if remaining_shares == 1 {
        return Ok(remaining_cents);
    }
    // i128: twice an i64 amount cannot overflow.
    let twice_mean = (2 * remaining_cents as i128 / remaining_shares as i128) as i64;
    Ok(twice_mean.min(remaining_cents - (remaining_shares - 1)))
}

/// Draws the next share.
pub fn next_share(
    remaining_cents: i64,
    remaining_shares: i64,
    rng: &mut impl Rng,
) -> Result<i64, SplitError> {
    let max = max_share(remaining_cents, remaining_shares)?;
    if remaining_shares == 1 {
        return Ok(max);
    }
    Ok(rng.random_range(1..=max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    /// Splits a whole packet, checking the rule at every draw.
    fn split_all(total: i64, shares: i64, seed: u64) -> Vec<i64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut left, mut out) = (total, Vec::new());
        for n in (1..=shares).rev() {
            let share = next_share(left, n, &mut rng).unwrap();
            assert!(share >= 1, "at least a cent");
            if n > 1 {
                assert!(
                    share as i128 * n as i128 <= 2 * left as i128,
                    "{share} is more than twice the mean of {left} over {n}"
                );
            } else {
                assert_eq!(share, left, "the last share takes the rest");
            }
            left -= share;
            out.push(share);
        }
        out
    }

    proptest! {
        #[test]
        fn shares_sum_to_the_total_within_the_bounds(
            shares in 1i64..300,
            extra in 0i64..1_000_000,
            seed in any::<u64>(),
        ) {
            let total = shares + extra;
            let split = split_all(total, shares, seed);
            prop_assert_eq!(split.len() as i64, shares);
            prop_assert_eq!(split.iter().sum::<i64>(), total);
        }

        #[test]
        fn huge_totals_neither_overflow_nor_drift(
            shares in 1i64..50,
            seed in any::<u64>(),
        ) {
            let total = i64::MAX / 2;
            prop_assert_eq!(split_all(total, shares, seed).iter().sum::<i64>(), total);
        }
    }

    #[test]
    fn one_cent_per_share_is_the_only_split() {
        assert_eq!(split_all(5, 5, 1), vec![1; 5]);
    }

    #[test]
    fn nothing_is_drawn_from_an_empty_or_short_packet() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(next_share(10, 0, &mut rng), Err(SplitError::NoShareLeft));
        assert_eq!(next_share(2, 3, &mut rng), Err(SplitError::TooFewCents));
    }
}
