//! Running commands and Lua scripts on one node or a cluster: EVALSHA pipelines with
//! the NOSCRIPT reload, the split of a pipeline by hash slot, and the slot arithmetic.

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;

use super::{Redis, RedisConn};

/// Builds an EVALSHA command for `script` so it can sit in a pipeline. A pipeline that
/// fails with NOSCRIPT (Redis restarted or flushed) is retried after [`load_scripts`].
/// Arguments are added by the caller with `.arg(..)`.
pub fn evalsha(script: &redis::Script, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    cmd
}

pub async fn load_scripts(
    conn: &mut RedisConn,
    scripts: &[&redis::Script],
) -> redis::RedisResult<()> {
    for script in scripts {
        script.prepare_invoke().load_async(conn).await?;
    }
    Ok(())
}

/// Runs a pipeline of commands (EVALSHA calls of `scripts`, or plain commands). A call
/// answered NOSCRIPT (Redis restarted, failed over or flushed its script cache) did not
/// run: the scripts are loaded and those calls are sent again (a few times at most,
/// should the cache be flushed once more in between).
///
/// On one node no call runs twice. On a cluster the client itself sends a pipeline again
/// when its answer was lost (a timeout, a failover), so the scripts are written to stand
/// that: a grant and a give-back carry ids applied once, a store that finds its own
/// bytes counts as stored, marks and drains are idempotent, and a take run twice can only
/// leak (which repair returns).
///
/// On a cluster the pipeline is split into one pipeline per hash slot (each command's
/// first key names its slot), sent concurrently; the answers come back in the order of
/// the commands. Every command must therefore touch one slot only.
pub async fn query_scripted<T: redis::FromRedisValue>(
    redis: &Redis,
    pipe: &redis::Pipeline,
    scripts: &[&redis::Script],
) -> redis::RedisResult<T> {
    if pipe.is_empty() {
        return redis::from_owned_redis_value(redis::Value::Array(Vec::new()));
    }
    let values = if redis.is_cluster() {
        let groups = split_by_slot(pipe);
        if groups.len() == 1 {
            run_scripted(redis.conn(), pipe, scripts).await?
        } else {
            let runs = groups
                .iter()
                .map(|(_, part)| run_scripted(redis.conn(), part, scripts));
            let answers = futures::future::try_join_all(runs).await?;
            let mut values = vec![redis::Value::Nil; pipe.len()];
            for ((indices, _), answer) in groups.iter().zip(answers) {
                for (&i, v) in indices.iter().zip(answer) {
                    values[i] = v;
                }
            }
            values
        }
    } else {
        run_scripted(redis.conn(), pipe, scripts).await?
    };
    redis::from_owned_redis_value(redis::Value::Array(values).extract_error()?)
}

/// The sources of the service's scripts by SHA1, so a call answered NOSCRIPT can be
/// sent again as EVAL (which also caches the script on that node).
static SOURCES: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, String>>> =
    std::sync::OnceLock::new();

/// A Lua script of the service: a [`redis::Script`] whose source is remembered for
/// the NOSCRIPT fallback of [`query_scripted`].
pub fn script(source: &str) -> redis::Script {
    let script = redis::Script::new(source);
    SOURCES
        .get_or_init(Default::default)
        .lock()
        .expect("script registry poisoned")
        .insert(script.get_hash().to_string(), source.to_string());
    script
}

/// A script that tells data written in another Redis life from its own: `run_id()`
/// ([`super::IDENTITY_LUA`]) defined before `body`.
pub fn script_with_identity(body: &str) -> redis::Script {
    script(&format!("{}\n{}", super::IDENTITY_LUA, body))
}

/// One pipeline on one connection, with the NOSCRIPT retry of [`query_scripted`].
///
/// A single node answers each command apart, so exactly the calls answered NOSCRIPT are
/// sent again after the scripts are loaded. A cluster answers a pipeline whole: one
/// NOSCRIPT fails it all. That happens on a node that has never seen the caller's
/// scripts (a replica promoted by a failover): scripts are always loaded as a set (the
/// caller's `scripts`), so such a node has none of them and no call of the pipeline
/// ran. The set is loaded on the node serving the pipeline's slot and the pipeline is
/// sent again.
async fn run_scripted(
    mut conn: RedisConn,
    pipe: &redis::Pipeline,
    scripts: &[&redis::Script],
) -> redis::RedisResult<Vec<redis::Value>> {
    const ATTEMPTS: usize = 3;
    if let RedisConn::Cluster(cluster) = &mut conn {
        let mut attempt = 1;
        loop {
            match cluster.req_packed_commands(pipe, 0, pipe.len()).await {
                Err(err)
                    if err.kind() == redis::ErrorKind::NoScriptError
                        && attempt < ATTEMPTS
                        && !scripts.is_empty() =>
                {
                    attempt += 1;
                    let slot = pipe
                        .cmd_iter()
                        .find_map(first_key)
                        .map(|k| key_slot(&k))
                        .unwrap_or(0);
                    load_on_slot(cluster, slot, scripts).await?;
                }
                other => return other,
            }
        }
    }
    let mut values = conn.req_packed_commands(pipe, 0, pipe.len()).await?;
    let commands: Vec<&redis::Cmd> = pipe.cmd_iter().collect();
    for _ in 1..ATTEMPTS {
        let not_run: Vec<usize> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v, redis::Value::ServerError(e) if e.code() == "NOSCRIPT"))
            .map(|(i, _)| i)
            .collect();
        if not_run.is_empty() || scripts.is_empty() {
            break;
        }
        load_scripts(&mut conn, scripts).await?;
        let mut again = redis::pipe();
        for &i in &not_run {
            again.add_command(commands[i].clone());
        }
        let answers = conn.req_packed_commands(&again, 0, again.len()).await?;
        for (i, answer) in not_run.into_iter().zip(answers) {
            values[i] = answer;
        }
    }
    Ok(values)
}

/// Loads `scripts` on the master serving `slot`.
async fn load_on_slot(
    cluster: &mut ClusterConnection,
    slot: u16,
    scripts: &[&redis::Script],
) -> redis::RedisResult<()> {
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    let sources = SOURCES.get_or_init(Default::default);
    for script in scripts {
        let source = sources
            .lock()
            .expect("script registry poisoned")
            .get(script.get_hash())
            .cloned();
        let Some(source) = source else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::ClientError,
                "a script not made with store::script cannot be loaded on one node",
            )));
        };
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(source);
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
            slot,
            SlotAddr::Master,
        )));
        cluster.route_command(&load, route).await?;
    }
    Ok(())
}

/// CRC16/XMODEM, the checksum Redis Cluster computes slots with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of a key (its hash tag's, when it has one).
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(slot_tag(key)) % 16_384
}

/// The hash tag a key's slot is computed from: the part between the first `{` and the
/// next `}` when not empty, else the whole key.
pub fn slot_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The first key of a command: after the script and key count for EVAL/EVALSHA, the
/// first argument otherwise.
fn first_key(cmd: &redis::Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(bytes) => Some(bytes),
            redis::Arg::Cursor => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let at = if name == b"EVALSHA" || name == b"EVAL" {
        3
    } else {
        1
    };
    args.get(at).map(|k| k.to_vec())
}

/// The commands of `pipe` grouped by hash slot tag, in order, each group a pipeline of
/// its own with the indices of its commands.
fn split_by_slot(pipe: &redis::Pipeline) -> Vec<(Vec<usize>, redis::Pipeline)> {
    let mut groups: Vec<(Vec<u8>, Vec<usize>, redis::Pipeline)> = Vec::new();
    for (i, cmd) in pipe.cmd_iter().enumerate() {
        let tag = first_key(cmd)
            .map(|k| slot_tag(&k).to_vec())
            .unwrap_or_default();
        match groups.iter_mut().find(|(t, ..)| *t == tag) {
            Some((_, indices, part)) => {
                indices.push(i);
                part.add_command(cmd.clone());
            }
            None => {
                let mut part = redis::pipe();
                part.add_command(cmd.clone());
                groups.push((tag, vec![i], part));
            }
        }
    }
    groups.into_iter().map(|(_, i, p)| (i, p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_tags_follow_the_cluster_rule() {
        assert_eq!(slot_tag(b"rpw{7}:tok:42"), b"7");
        assert_eq!(slot_tag(b"rpw:bud:{cny.1.3}"), b"cny.1.3");
        assert_eq!(slot_tag(b"rpw:switches"), b"rpw:switches");
        assert_eq!(slot_tag(b"a{}b{c}"), b"a{}b{c}");
        assert_eq!(slot_tag(b"a{b"), b"a{b");
    }

    #[test]
    fn slots_are_the_clusters() {
        // The reference values of the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
    }

    #[test]
    fn a_pipeline_splits_by_slot_and_keeps_its_order() {
        let mut pipe = redis::pipe();
        pipe.hget("p{1}:tok:1", "a")
            .hget("p{2}:tok:2", "b")
            .cmd("EVALSHA")
            .arg("sha")
            .arg(1)
            .arg("p{1}:settle")
            .xlen("p{2}:settle")
            .get("p:switches");
        let groups = split_by_slot(&pipe);
        let indices: Vec<Vec<usize>> = groups.iter().map(|(i, _)| i.clone()).collect();
        assert_eq!(indices, vec![vec![0, 2], vec![1, 3], vec![4]]);
        assert_eq!(groups[0].1.len(), 2);
    }
}
