use super::grant_chunk;

#[test]
fn a_grant_is_a_slice_of_the_budget_per_sub_stock() {
    // 1,000,000 cents over 16 sub-stocks in 8 slices: 7,812 cents a grant.
    assert_eq!(grant_chunk(1_000_000, 100, 16, 8), 7_812);
    // Sixteen sub-stocks times eight grants never pass the budget.
    assert!(grant_chunk(1_000_000, 100, 16, 8) * 16 * 8 <= 1_000_000);
}

#[test]
fn a_grant_always_covers_one_award() {
    assert_eq!(grant_chunk(1_000, 500, 16, 8), 500);
    assert_eq!(grant_chunk(0, 1, 16, 8), 1);
}

#[test]
fn zero_settings_do_not_divide_by_zero() {
    assert_eq!(grant_chunk(1_000, 1, 0, 0), 1_000);
}
