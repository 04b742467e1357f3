//! The issuance counters store.lua and mark.lua keep beside the tokens, per partition
//! and activity (`P{p}:cnt:{activity}`): per hour `{hour}:n|c` (issued) and
//! `{hour}:sn|sc` (settled), and the same per budget generation under `g{gen}:`.
//! Only their sums over the partitions mean anything: on one Redis node a store call
//! counts its tokens in its first partition's hash, whichever partitions they are in.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Tokens;

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
