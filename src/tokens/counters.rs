//! The issuance counters store.lua and mark.lua keep beside the tokens, per partition
//! and activity (`P{p}:cnt:{activity}`): per hour `{hour}:n|c` (issued) and
//! `{hour}:sn|sc` (settled), and the same per budget generation under `g{gen}:`.
//! Only their sums over the partitions mean anything: on one Redis node a store call
//! counts its tokens in its first partition's hash, whichever partitions they are in.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::Tokens;
use crate::store::hour_of;

/// A counter group of one store.lua or mark.lua call: its tokens of one counters hash
/// (`key`, 1-based in the call's KEYS), hour and budget generation, and their sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterGroup {
    pub key: usize,
    pub hour: String,
    pub gen: i64,
    pub tokens: i64,
    pub cents: i64,
}

impl CounterGroup {
    /// The group's generation as its counter fields name it (`g{gen}`).
    pub fn gen_field(&self) -> String {
        format!("g{}", self.gen)
    }
}

/// Where a token is counted: the counters hash of `owner` (its activity, or its
/// template for a coupon) in `partition`, the hour of `at_ms` and budget generation
/// `gen`.
#[derive(Debug, Clone, Copy)]
pub struct CountedIn<'a> {
    pub partition: u32,
    pub owner: &'a str,
    pub at_ms: i64,
    pub gen: i64,
}

/// The counter groups of one script call, in the order they are passed (a token names
/// its group by its 1-based place in that order), and the counters hashes they are in,
/// each appended once to the call's KEYS.
#[derive(Debug, Default)]
pub struct CounterGroups<'a> {
    groups: Vec<CounterGroup>,
    /// (KEYS index of the hash, hour number since the epoch, generation) -> group.
    index: HashMap<(usize, i64, i64), usize>,
    /// (partition, owner) -> KEYS index of its counters hash.
    hashes: HashMap<(u32, &'a str), usize>,
}

impl<'a> CounterGroups<'a> {
    /// Counts a token of `cents` where `place` says; `key_of` names the counters hash
    /// the first time the call meets it, and the name is appended to `keys`. Returns the
    /// token's group, 1-based. The hour is formatted once per group.
    pub fn add(
        &mut self,
        keys: &mut Vec<String>,
        place: CountedIn<'a>,
        key_of: impl FnOnce(u32, &str) -> String,
        cents: i64,
    ) -> usize {
        let key = *self
            .hashes
            .entry((place.partition, place.owner))
            .or_insert_with(|| {
                keys.push(key_of(place.partition, place.owner));
                keys.len()
            });
        let groups = &mut self.groups;
        let index = *self
            .index
            .entry((key, place.at_ms.div_euclid(3_600_000), place.gen))
            .or_insert_with(|| {
                groups.push(CounterGroup {
                    key,
                    hour: hour_of(place.at_ms),
                    gen: place.gen,
                    tokens: 0,
                    cents: 0,
                });
                groups.len()
            });
        let group = &mut groups[index - 1];
        group.tokens += 1;
        group.cents += cents;
        index
    }

    /// How many groups the call has.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// How many counters hashes the call names.
    pub fn hashes(&self) -> usize {
        self.hashes.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &CounterGroup> {
        self.groups.iter()
    }
}

/// A count of awards and their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub count: i64,
    pub cents: i64,
}

/// Issued and settled totals of one hour or one generation, summed over partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub issued: Totals,
    pub settled: Totals,
}

/// Per hour (`YYYYMMDDHH`) and per budget generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivityCounters {
    pub hours: BTreeMap<String, Counters>,
    pub gens: BTreeMap<i64, Counters>,
}

impl ActivityCounters {
    /// Adds one partition's counter hash.
    pub fn add(&mut self, map: BTreeMap<String, i64>) {
        for (field, value) in map {
            let Some((when, what)) = field.split_once(':') else {
                continue;
            };
            let counter = match when.strip_prefix('g') {
                Some(gen) => match gen.parse::<i64>() {
                    Ok(gen) => self.gens.entry(gen).or_default(),
                    Err(_) => continue,
                },
                None => self.hours.entry(when.to_string()).or_default(),
            };
            match what {
                "n" => counter.issued.count += value,
                "c" => counter.issued.cents += value,
                "sn" => counter.settled.count += value,
                "sc" => counter.settled.cents += value,
                _ => {}
            }
        }
    }

    /// Everything issued, over the hours.
    pub fn issued(&self) -> Totals {
        self.hours
            .values()
            .fold(Totals::default(), |acc, h| Totals {
                count: acc.count + h.issued.count,
                cents: acc.cents + h.issued.cents,
            })
    }
}

impl Tokens {
    /// Every counter of `activity` over the partitions, in one round trip.
    pub async fn counters(&self, activity: &str) -> redis::RedisResult<ActivityCounters> {
        let redis = &self.redis;
        let mut pipe = redis::pipe();
        for p in 0..redis.partitions() {
            pipe.hgetall(redis.counters_key(p, activity));
        }
        let maps: Vec<BTreeMap<String, i64>> = redis.query(&pipe).await?;
        let mut out = ActivityCounters::default();
        for map in maps {
            out.add(map);
        }
        Ok(out)
    }

    /// Everything issued for `activity`.
    pub async fn issued_totals(&self, activity: &str) -> redis::RedisResult<Totals> {
        Ok(self.counters(activity).await?.issued())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_of_one_hash_hour_and_generation_share_a_group() {
        let hour = 1_795_000_000_000 - 1_795_000_000_000 % 3_600_000;
        let at = |owner, at_ms, gen| CountedIn {
            partition: 3,
            owner,
            at_ms,
            gen,
        };
        let name = |p: u32, owner: &str| format!("cnt:{p}:{owner}");
        let mut keys = vec!["stream".to_string()];
        let mut g = CounterGroups::default();
        assert_eq!(g.add(&mut keys, at("a", hour + 1, 2), name, 10), 1);
        assert_eq!(g.add(&mut keys, at("a", hour + 2_000, 2), name, 5), 1);
        assert_eq!(
            g.add(&mut keys, at("a", hour + 2_000, 3), name, 7),
            2,
            "another generation"
        );
        assert_eq!(
            g.add(&mut keys, at("b", hour + 1, 2), name, 1),
            3,
            "another hash"
        );
        assert_eq!(
            g.add(&mut keys, at("a", hour + 3_600_000, 2), name, 1),
            4,
            "another hour"
        );
        assert_eq!(
            keys,
            ["stream", "cnt:3:a", "cnt:3:b"],
            "each hash named once"
        );
        assert_eq!(g.hashes(), 2);
        let first = g.iter().next().unwrap();
        assert_eq!((first.key, first.tokens, first.cents), (2, 2, 15));
        assert_eq!(
            (first.hour.as_str(), first.gen_field()),
            (hour_of(hour).as_str(), "g2".to_string())
        );
        let later = g.iter().nth(3).unwrap();
        assert_eq!(later.hour, hour_of(hour + 3_600_000));
        assert_eq!(g.iter().nth(2).unwrap().key, 3);
        assert_eq!(g.len(), 4);
    }

    #[test]
    fn partitions_add_up_per_hour_and_generation() {
        let mut c = ActivityCounters::default();
        let part = |pairs: &[(&str, i64)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>()
        };
        c.add(part(&[
            ("2026112312:n", 2),
            ("2026112312:c", 30),
            ("g1:n", 2),
            ("g1:c", 30),
        ]));
        c.add(part(&[
            ("2026112312:n", 1),
            ("2026112312:c", 5),
            ("2026112312:sn", 1),
            ("2026112312:sc", 5),
            ("g2:n", 1),
            ("g2:c", 5),
            ("junk", 9),
            ("gx:n", 4),
        ]));
        let h = c.hours["2026112312"];
        assert_eq!(
            h.issued,
            Totals {
                count: 3,
                cents: 35
            }
        );
        assert_eq!(h.settled, Totals { count: 1, cents: 5 });
        assert_eq!(c.gens[&1].issued.cents, 30);
        assert_eq!(c.gens[&2].issued.cents, 5);
        assert_eq!(c.gens.len(), 2);
        assert_eq!(
            c.issued(),
            Totals {
                count: 3,
                cents: 35
            }
        );
    }
}
