//! `discovery-bench`: drives a real `discovery-server` process over real gRPC on 127.0.0.1 and
//! reports what an update costs, how fast a full cluster's watchers are served, and how the store
//! scales. Run `discovery-bench --help` for the phases and their flags.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use openspan_proto::discovery::server::cluster_client::ClusterClient;
use openspan_proto::discovery::server::cluster_server::{Cluster, ClusterServer};
use openspan_proto::discovery::server::{
    AffiliateDeleteRequest, AffiliateDeleteResponse, AffiliateUpdateRequest,
    AffiliateUpdateResponse, HelloRequest, HelloResponse, ListRequest, ListResponse, WatchRequest,
    WatchResponse,
};
use prost::Message;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

// Targets the report checks against.
const TARGET_CPU_RATIO: f64 = 1.1;
const TARGET_SNAPSHOT_ALL: Duration = Duration::from_secs(5);
const TARGET_FANOUT_P99: Duration = Duration::from_millis(10);
const TARGET_PEAK_RSS_KIB: u64 = 256 * 1024;
const TARGET_OVERHEAD_BYTES: f64 = 1024.0;
const TARGET_SNAPSHOT_WRITE: Duration = Duration::from_secs(1);
const TARGET_SNAPSHOT_LOAD: Duration = Duration::from_secs(1);
const TARGET_REPLICA_FANOUT_P99: Duration = Duration::from_millis(50);

/// Every single RPC gives up after this long.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a started server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Marks affiliate data that carries a fan-out sequence number in its first 8 bytes.
const SEQ_MAGIC: &[u8; 8] = b"BENCHSEQ";
const TTL: prost_types::Duration = prost_types::Duration {
    seconds: 30 * 60,
    nanos: 0,
};
const ENDPOINT_BYTES: usize = 16;
const ENDPOINTS_PER_AFFILIATE: usize = 2;
/// Server log lines kept in memory (the rest are read and dropped).
const MAX_LOG_LINES: usize = 100_000;

/// Benchmarks discovery-server over real gRPC on 127.0.0.1.
///
/// Starts the server as a child process (the `discovery-server` binary next to this one unless
/// --server-bin says otherwise) with the HTTP listeners off and the per-IP rate limit off, runs
/// the selected phases against it and prints a report (with --json, the report goes to stderr and
/// a JSON summary to stdout). Every server started is killed at the end, also on failure. Each
/// phase is bounded in count and time.
///
/// Phases (--phases, all by default):
///
///   update  Update cost. --update-clients clients, each on its own connection (a separate
///           node), send AffiliateUpdate with 300-800 random bytes of data (new every request),
///           two 16-byte endpoints and a 30 min TTL, one affiliate per client spread over
///           --update-clusters clusters. After --update-warmup-secs, for --update-secs (or until
///           --update-max updates) it counts updates/s, p50/p99 latency and the server's CPU
///           time (utime+stime from /proc/<pid>/stat) per update. It then does the same against
///           a bare tonic server (this binary's hidden `bare-server` mode, whose methods return
///           at once) and reports ours/bare CPU per update. Both are measured
///           --update-rounds times in alternating order and the verdict uses the CPU time
///           pooled over the rounds; the CPU other processes used meanwhile is shown too, as
///           it disturbs the figures. Target: <= 1.1x.
///
///   fanout  Fan-out at a full cluster. Fills one cluster with --fanout-affiliates affiliates
///           (--record-bytes of data, two endpoints), opens --fanout-watchers Watch streams over
///           --fanout-connections connections at once and times until every watcher holds its
///           snapshot (checked to list every affiliate). Then sends --fanout-updates updates at
///           --fanout-rate per second to existing affiliates, each carrying a sequence number,
///           and for each measures the delay from sending it until every watcher received it.
///           Counts missed deliveries and streams that ended with an error, and samples the
///           server's RSS every 20 ms (plus VmHWM). Targets: all snapshots within 5 s, update
///           p99 <= 10 ms, nothing missed, peak RSS <= 256 MiB.
///
///   scale   Scale. Starts a server with snapshots on (in a temporary directory), measures its
///           RSS, loads --scale-clusters x --scale-per-cluster affiliates with --scale-clients
///           concurrent clients, measures RSS again and reports the memory per affiliate beyond
///           its payload (target <= 1 KiB). Then sends SIGTERM and times the shutdown, which
///           writes the final snapshot (the server's own log gives the write time), and starts a
///           new server on that snapshot, timing until it serves a List of a full cluster (the
///           log gives the load time). Targets: write and load under 1 s each.
///
///   replicas  Replicas on etcd (issue 12; not in the default set: it needs `etcd` on PATH).
///           Starts a --etcd-members etcd cluster on loopback (free ports, data in a temporary
///           directory), --replicas discovery-server replicas on it (--store etcd) and one
///           in-memory server, and measures both side by side in one run: the update load of
///           the update phase (its flags; client i talks to server i % servers) for updates/s
///           and server CPU per update (replicas summed; etcd's CPU apart), alternating the
///           store every round; then the fan-out of the fan-out phase (its flags), the watchers
///           spread over the servers and the updates sent round-robin over them (or through
///           one, --replicas-send one), reporting per update the delay until EVERY watcher has
///           it and its parts: answered, seen by the bench's own etcd watch, first watcher,
///           first watcher of the last server, spread within one server. Also etcd's watcher
///           and watch-stream counts (its /metrics, members summed) during the fan-out, and the
///           peak RSS (VmHWM) of every server and etcd member. Every process it started is
///           killed and the directory removed at the end, on failure, on Ctrl-C, and after 30
///           min at most. Targets: every-watcher p99 <= 50 ms on etcd, nothing missed.
///
/// --quick scales every phase down to a smoke run that finishes in a few seconds; any count
/// flag given explicitly still wins.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Internal: serve a Cluster service whose methods return at once (the phase 1 baseline).
    #[command(hide = true)]
    BareServer {
        #[arg(long)]
        addr: SocketAddr,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    Update,
    Fanout,
    Scale,
    Replicas,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// The discovery-server binary [default: `discovery-server` next to this binary].
    #[arg(long, value_name = "PATH")]
    server_bin: Option<PathBuf>,

    /// Phases to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "update,fanout,scale"
    )]
    phases: Vec<Phase>,

    /// Small counts and short windows: a smoke run (for CI).
    #[arg(long)]
    quick: bool,

    /// Print the human report to stderr and a JSON summary to stdout.
    #[arg(long)]
    json: bool,

    /// Exit with status 2 when any target is not met.
    #[arg(long)]
    check: bool,

    /// Update: concurrent clients, each on its own connection [default: 64; --quick: 8].
    #[arg(long, value_name = "N")]
    update_clients: Option<usize>,

    /// Update: clusters the clients are spread over [default: 8; --quick: 2].
    #[arg(long, value_name = "N")]
    update_clusters: Option<usize>,

    /// Update: warm-up before measuring, in seconds [default: 1; --quick: 0.5].
    #[arg(long, value_name = "SECS")]
    update_warmup_secs: Option<f64>,

    /// Update: measured window, in seconds [default: 5; --quick: 2].
    #[arg(long, value_name = "SECS")]
    update_secs: Option<f64>,

    /// Update: the measured window also ends after this many updates [default: 2000000].
    #[arg(long, value_name = "N")]
    update_max: Option<u64>,

    /// Update: rounds, each measuring both servers (in alternating order); the verdict uses the
    /// pooled CPU time over all rounds [default: 3; --quick: 1].
    #[arg(long, value_name = "N")]
    update_rounds: Option<usize>,

    /// Fan-out: affiliates in the watched cluster [default: 1000; --quick: 100].
    #[arg(long, value_name = "N")]
    fanout_affiliates: Option<usize>,

    /// Fan-out: Watch streams [default: 1000; --quick: 100].
    #[arg(long, value_name = "N")]
    fanout_watchers: Option<usize>,

    /// Fan-out: connections the Watch streams share [default: 10; --quick: 2].
    #[arg(long, value_name = "N")]
    fanout_connections: Option<usize>,

    /// Fan-out: updates sent once every watcher has its snapshot [default: 200; --quick: 25].
    #[arg(long, value_name = "N")]
    fanout_updates: Option<usize>,

    /// Fan-out: updates per second [default: 50].
    #[arg(long, value_name = "PER_SEC")]
    fanout_rate: Option<f64>,

    /// Fan-out: how long watchers may take after the last update before they are stopped [default: 5].
    #[arg(long, value_name = "SECS")]
    fanout_grace_secs: Option<f64>,

    /// Scale: clusters to fill [default: 100; --quick: 10].
    #[arg(long, value_name = "N")]
    scale_clusters: Option<usize>,

    /// Scale: affiliates per cluster (at most the server's --max-affiliates, 1024) [default: 1000; --quick: 1000].
    #[arg(long, value_name = "N")]
    scale_per_cluster: Option<usize>,

    /// Scale (and fan-out fill): concurrent loading clients, each on its own connection [default: 32; --quick: 8].
    #[arg(long, value_name = "N")]
    scale_clients: Option<usize>,

    /// Affiliate data bytes of the fan-out and scale records [default: 800].
    #[arg(long, value_name = "BYTES")]
    record_bytes: Option<usize>,

    /// Replicas: discovery-server replicas on etcd.
    #[arg(long, value_name = "N", default_value_t = 3)]
    replicas: usize,

    /// Replicas: members of the etcd cluster the bench starts.
    #[arg(long, value_name = "N", default_value_t = 3)]
    etcd_members: usize,

    /// Replicas: send the fan-out updates round-robin over the servers, or all through one.
    #[arg(long, value_enum, default_value = "round-robin")]
    replicas_send: ReplicasSend,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ReplicasSend {
    RoundRobin,
    One,
}

// ---------------------------------------------------------------------------------------------
// Settings resolved from the flags.

#[derive(Clone, Debug, Serialize)]
struct UpdateConfig {
    clients: usize,
    clusters: usize,
    warmup_s: f64,
    window_s: f64,
    max_updates: u64,
    rounds: usize,
    data_min: usize,
    data_max: usize,
}

#[derive(Clone, Debug, Serialize)]
struct FanoutConfig {
    affiliates: usize,
    watchers: usize,
    connections: usize,
    updates: usize,
    rate_per_s: f64,
    grace_s: f64,
    record_bytes: usize,
    fill_clients: usize,
}

#[derive(Clone, Debug, Serialize)]
struct ScaleConfig {
    clusters: usize,
    per_cluster: usize,
    clients: usize,
    record_bytes: usize,
}

#[derive(Clone, Debug, Serialize)]
struct ReplicasConfig {
    replicas: usize,
    etcd_members: usize,
    send_round_robin: bool,
}

struct Settings {
    server_bin: PathBuf,
    phases: Vec<Phase>,
    update: UpdateConfig,
    fanout: FanoutConfig,
    scale: ScaleConfig,
    replicas: ReplicasConfig,
}

fn pick<T>(given: Option<T>, full: T, quick: T, is_quick: bool) -> T {
    given.unwrap_or(if is_quick { quick } else { full })
}

impl BenchArgs {
    fn settings(&self) -> anyhow::Result<Settings> {
        let q = self.quick;
        let server_bin = match &self.server_bin {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("cannot find this binary's path")?
                .with_file_name("discovery-server"),
        };
        let record_bytes = pick(self.record_bytes, 800, 800, q);
        let scale_clients = pick(self.scale_clients, 32, 8, q);
        let settings = Settings {
            server_bin,
            phases: self.phases.clone(),
            update: UpdateConfig {
                clients: pick(self.update_clients, 64, 8, q),
                clusters: pick(self.update_clusters, 8, 2, q),
                warmup_s: pick(self.update_warmup_secs, 1.0, 0.5, q),
                window_s: pick(self.update_secs, 5.0, 2.0, q),
                max_updates: pick(self.update_max, 2_000_000, 2_000_000, q),
                rounds: pick(self.update_rounds, 3, 1, q),
                data_min: 300,
                data_max: 800,
            },
            fanout: FanoutConfig {
                affiliates: pick(self.fanout_affiliates, 1000, 100, q),
                watchers: pick(self.fanout_watchers, 1000, 100, q),
                connections: pick(self.fanout_connections, 10, 2, q),
                updates: pick(self.fanout_updates, 200, 25, q),
                rate_per_s: pick(self.fanout_rate, 50.0, 50.0, q),
                grace_s: pick(self.fanout_grace_secs, 5.0, 5.0, q),
                record_bytes,
                fill_clients: scale_clients,
            },
            scale: ScaleConfig {
                clusters: pick(self.scale_clusters, 100, 10, q),
                per_cluster: pick(self.scale_per_cluster, 1000, 1000, q),
                clients: scale_clients,
                record_bytes,
            },
            replicas: ReplicasConfig {
                replicas: self.replicas,
                etcd_members: self.etcd_members,
                send_round_robin: self.replicas_send == ReplicasSend::RoundRobin,
            },
        };
        settings.validate()?;
        Ok(settings)
    }
}

impl Settings {
    fn validate(&self) -> anyhow::Result<()> {
        let (u, f, s) = (&self.update, &self.fanout, &self.scale);
        ensure!(
            u.clients >= 1 && u.clusters >= 1,
            "--update-clients and --update-clusters must be at least 1"
        );
        ensure!(
            u.warmup_s >= 0.0 && u.window_s > 0.0 && u.window_s <= 3600.0 && u.warmup_s <= 3600.0,
            "--update-secs must be in (0, 3600] and --update-warmup-secs in [0, 3600]"
        );
        ensure!(u.max_updates >= 1, "--update-max must be at least 1");
        ensure!(
            (1..=100).contains(&u.rounds),
            "--update-rounds must be between 1 and 100"
        );
        ensure!(
            f.affiliates >= 1 && f.watchers >= 1 && f.connections >= 1 && f.updates >= 1,
            "fan-out counts must be at least 1"
        );
        ensure!(
            f.rate_per_s > 0.0 && f.rate_per_s <= 100_000.0,
            "--fanout-rate must be in (0, 100000]"
        );
        ensure!(
            f.grace_s >= 0.0 && f.grace_s <= 600.0,
            "--fanout-grace-secs must be in [0, 600]"
        );
        ensure!(
            s.clusters >= 1 && s.per_cluster >= 1 && s.clients >= 1,
            "scale counts must be at least 1"
        );
        ensure!(
            (SEQ_MAGIC.len() + 8..=2048).contains(&f.record_bytes),
            "--record-bytes must be between 16 and 2048 (the server's limit)"
        );
        ensure!(
            f.affiliates <= 1024 && s.per_cluster <= 1024,
            "a cluster holds at most 1024 affiliates (the server's default --max-affiliates)"
        );
        ensure!(
            (1..=16).contains(&self.replicas.replicas),
            "--replicas must be between 1 and 16"
        );
        ensure!(
            matches!(self.replicas.etcd_members, 1 | 3 | 5),
            "--etcd-members must be 1, 3 or 5"
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers: random data, requests, connections, statistics.

/// splitmix64: fast, good enough for filler bytes, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        for chunk in buf.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes()[..chunk.len()]);
        }
        buf
    }
}

/// Two fixed 16-byte endpoints per affiliate: re-sending them never grows the stored list.
fn endpoints_for(affiliate: u64) -> Vec<Bytes> {
    (0..ENDPOINTS_PER_AFFILIATE as u64)
        .map(|n| {
            let mut endpoint = [0u8; ENDPOINT_BYTES];
            endpoint[..8].copy_from_slice(&affiliate.to_le_bytes());
            endpoint[8..].copy_from_slice(&n.to_le_bytes());
            Bytes::copy_from_slice(&endpoint)
        })
        .collect()
}

fn update_request(
    cluster_id: &str,
    affiliate_id: &str,
    data: Vec<u8>,
    endpoints: Vec<Bytes>,
) -> AffiliateUpdateRequest {
    AffiliateUpdateRequest {
        cluster_id: cluster_id.to_owned(),
        affiliate_id: affiliate_id.to_owned(),
        affiliate_data: Some(Bytes::from(data)),
        affiliate_endpoints: endpoints,
        ttl: Some(TTL),
    }
}

/// Data whose first 16 bytes are a sequence number and [`SEQ_MAGIC`], the rest random.
fn sequenced_data(seq: u64, len: usize, rng: &mut Rng) -> Vec<u8> {
    let mut data = rng.bytes(len);
    data[..8].copy_from_slice(&seq.to_le_bytes());
    data[8..16].copy_from_slice(SEQ_MAGIC);
    data
}

fn sequence_of(data: &[u8]) -> Option<u64> {
    (data.len() >= 16 && &data[8..16] == SEQ_MAGIC)
        .then(|| u64::from_le_bytes(data[..8].try_into().unwrap_or_default()))
}

/// A new connection (its own HTTP/2 session) with windows and a decoding limit large enough for
/// a full cluster's snapshot.
async fn connect(addr: SocketAddr) -> anyhow::Result<ClusterClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .initial_connection_window_size(16 << 20)
        .initial_stream_window_size(4 << 20)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    Ok(ClusterClient::new(channel).max_decoding_message_size(64 << 20))
}

async fn connect_many(
    addr: SocketAddr,
    count: usize,
) -> anyhow::Result<Vec<ClusterClient<Channel>>> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        clients.push(connect(addr).await?);
    }
    Ok(clients)
}

/// Sends one update; `Err` holds a one-line description of what went wrong.
async fn send_update(
    client: &mut ClusterClient<Channel>,
    request: AffiliateUpdateRequest,
) -> Result<(), String> {
    match tokio::time::timeout(RPC_TIMEOUT, client.affiliate_update(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err(format!("no answer within {RPC_TIMEOUT:?}")),
    }
}

/// Waits for every task, aborting them all if they take longer than `limit`.
async fn join_all_within<T>(
    handles: Vec<JoinHandle<T>>,
    limit: Duration,
    what: &str,
) -> anyhow::Result<Vec<T>> {
    let aborts: Vec<_> = handles.iter().map(JoinHandle::abort_handle).collect();
    match tokio::time::timeout(limit, futures::future::join_all(handles)).await {
        Ok(results) => results
            .into_iter()
            .map(|r| r.with_context(|| format!("a {what} task failed")))
            .collect(),
        Err(_) => {
            aborts.iter().for_each(|a| a.abort());
            bail!("{what} tasks did not finish within {limit:?}")
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .context("cannot find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?)
}

// ---------------------------------------------------------------------------------------------
// /proc readers.

fn proc_status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// utime + stime of a process, in clock ticks.
fn proc_cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses: state is field 3, so utime
    // (field 14) and stime (field 15) are the 12th and 13th after it.
    let rest = stat
        .rsplit_once(')')
        .context("malformed /proc/<pid>/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("short /proc/<pid>/stat")?.parse()?)
    };
    Ok(tick(11)? + tick(12)?)
}

/// CPU time every process on the machine spent (user, nice, system, steal), in clock ticks.
/// Interrupt time is left out: it is not charged to processes either.
fn machine_busy_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    // user nice system idle iowait irq softirq steal ...
    let values: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    ensure!(values.len() == 8, "malformed /proc/stat");
    Ok(values[0] + values[1] + values[2] + values[7])
}

fn clock_ticks_per_second() -> u64 {
    Process::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Polls a process's VmRSS every 20 ms and keeps the largest value.
struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let (peak_kib, stop) = (Arc::new(AtomicU64::new(0)), CancellationToken::new());
        let task = {
            let (peak_kib, stop) = (peak_kib.clone(), stop.clone());
            tokio::spawn(async move {
                // At most an hour of samples, whatever happens.
                for _ in 0..180_000 {
                    let Ok(rss) = proc_status_kib(pid, "VmRSS") else {
                        return;
                    };
                    peak_kib.fetch_max(rss, Ordering::Relaxed);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
            })
        };
        Self {
            peak_kib,
            stop,
            task,
        }
    }

    async fn finish(self) -> u64 {
        self.stop.cancel();
        let _ = self.task.await;
        self.peak_kib.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// Child server processes.

/// A server child process; killed when dropped unless it already exited.
struct ServerProcess {
    name: String,
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequence: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `key=value` in a log line.
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("{key}=");
    let start = line.match_indices(&needle).find_map(|(i, _)| {
        (i == 0 || line.as_bytes()[i - 1].is_ascii_whitespace()).then_some(i + needle.len())
    })?;
    line[start..].split_whitespace().next()
}

impl ServerProcess {
    fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        addr: SocketAddr,
        rust_log: &str,
    ) -> anyhow::Result<Self> {
        let mut command = Process::new(program);
        command
            .args(args)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Only the flags given here configure the server.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("DISCOVERY_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        let stderr = child
            .stderr
            .take()
            .context("the child's stderr is not captured")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                // Ends when the child closes its stderr (it exits).
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    if log.len() < MAX_LOG_LINES {
                        log.push(strip_ansi(&line));
                    }
                }
            })
        };
        Ok(Self {
            name: name.to_owned(),
            child,
            addr,
            log,
            reader: Some(reader),
        })
    }

    /// Starts `discovery-server` on a free loopback port with the HTTP listeners and the rate
    /// limit off, plus `extra` flags.
    fn discovery(settings: &Settings, extra: &[String], rust_log: &str) -> anyhow::Result<Self> {
        let addr = free_loopback_addr()?;
        let mut args = vec![
            format!("--addr={addr}"),
            "--landing-addr=".to_owned(),
            "--metrics-addr=".to_owned(),
            "--ip-rate-limit=0".to_owned(),
        ];
        args.extend_from_slice(extra);
        Self::spawn(
            "discovery-server",
            &settings.server_bin,
            &args,
            addr,
            rust_log,
        )
    }

    /// Starts this binary's bare tonic server.
    fn bare() -> anyhow::Result<Self> {
        let addr = free_loopback_addr()?;
        let program = std::env::current_exe().context("cannot find this binary's path")?;
        Self::spawn(
            "bare tonic server",
            &program,
            &["bare-server".to_owned(), format!("--addr={addr}")],
            addr,
            "warn",
        )
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let tail = log.len().saturating_sub(20);
        log[tail..].join("\n")
    }

    fn log_line(&self, needle: &str) -> Option<String> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().find(|line| line.contains(needle)).cloned()
    }

    /// Waits (bounded) for a log line containing `needle`.
    async fn wait_log_line(&self, needle: &str, limit: Duration) -> Option<String> {
        let start = Instant::now();
        loop {
            if let Some(line) = self.log_line(needle) {
                return Some(line);
            }
            if start.elapsed() >= limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the port accepts TCP connections; returns how long that took.
    async fn wait_accepting(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited before accepting connections ({status}); its log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= limit {
                bail!(
                    "{} did not accept connections within {limit:?}; its log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit; returns how long it took and
    /// the largest VmRSS seen meanwhile (KiB, sampled every millisecond or so).
    async fn terminate(&mut self, limit: Duration) -> anyhow::Result<(Duration, ExitStatus, u64)> {
        let start = Instant::now();
        let pid = self.pid();
        let mut peak_rss = proc_status_kib(pid, "VmRSS").unwrap_or(0);
        let sent = Process::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .context("cannot run kill")?;
        ensure!(sent.success(), "kill -TERM {} failed", self.pid());
        loop {
            if let Some(status) = self.child.try_wait()? {
                let elapsed = start.elapsed();
                if let Some(reader) = self.reader.take() {
                    // The pipe is closed; this returns at once with every line read.
                    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
                }
                return Ok((elapsed, status, peak_rss));
            }
            if start.elapsed() >= limit {
                bail!("{} did not exit within {limit:?} of SIGTERM", self.name);
            }
            if let Ok(rss) = proc_status_kib(pid, "VmRSS") {
                peak_rss = peak_rss.max(rss);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("discovery-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }

    /// A directory of its own next to [`TempDir::new`]'s.
    fn with_tag(tag: &str) -> anyhow::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("discovery-bench-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The bare baseline server.

struct BareCluster;

#[tonic::async_trait]
impl Cluster for BareCluster {
    async fn hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        Ok(Response::new(HelloResponse::default()))
    }

    async fn affiliate_update(
        &self,
        _: Request<AffiliateUpdateRequest>,
    ) -> Result<Response<AffiliateUpdateResponse>, Status> {
        Ok(Response::new(AffiliateUpdateResponse {}))
    }

    async fn affiliate_delete(
        &self,
        _: Request<AffiliateDeleteRequest>,
    ) -> Result<Response<AffiliateDeleteResponse>, Status> {
        Ok(Response::new(AffiliateDeleteResponse {}))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Ok(Response::new(ListResponse::default()))
    }

    type WatchStream = futures::stream::Empty<Result<WatchResponse, Status>>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("the bare server does not watch"))
    }
}

/// Serves [`BareCluster`] with the transport settings discovery-server uses.
async fn bare_server(addr: SocketAddr) -> anyhow::Result<()> {
    ensure!(
        addr.ip().is_loopback(),
        "the bare server only listens on loopback"
    );
    Server::builder()
        .tcp_nodelay(true)
        .initial_connection_window_size(Some(4 << 20))
        .initial_stream_window_size(Some(1 << 20))
        .add_service(ClusterServer::new(BareCluster).max_decoding_message_size(256 * 1024))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("bare server failed")
}

// ---------------------------------------------------------------------------------------------
// Loading many affiliates quickly (fan-out fill and scale).

#[derive(Clone)]
struct FillSpec {
    cluster_prefix: &'static str,
    clusters: usize,
    per_cluster: usize,
    record_bytes: usize,
}

impl FillSpec {
    fn total(&self) -> usize {
        self.clusters * self.per_cluster
    }

    fn cluster_id(&self, cluster: usize) -> String {
        format!("{}-{cluster}", self.cluster_prefix)
    }

    fn affiliate_id(index: usize) -> String {
        format!("node-{index:05}")
    }

    fn request(&self, index: usize, rng: &mut Rng) -> AffiliateUpdateRequest {
        update_request(
            &self.cluster_id(index / self.per_cluster),
            &Self::affiliate_id(index % self.per_cluster),
            rng.bytes(self.record_bytes),
            endpoints_for(index as u64),
        )
    }

    fn payload_bytes(&self) -> usize {
        self.record_bytes + ENDPOINTS_PER_AFFILIATE * ENDPOINT_BYTES
    }
}

#[derive(Debug, Serialize)]
struct FillOutcome {
    affiliates: usize,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    per_s: f64,
}

/// Creates every affiliate of `spec` with `clients` concurrent connections.
async fn fill(
    addr: SocketAddr,
    clients: usize,
    spec: &FillSpec,
    limit: Duration,
) -> anyhow::Result<FillOutcome> {
    fill_retrying(addr, clients, spec, limit, 0).await
}

/// [`fill`], sending a failed update again (after 10 ms) up to `retries` times, as a node
/// would; every failed attempt counts as an error.
async fn fill_retrying(
    addr: SocketAddr,
    clients: usize,
    spec: &FillSpec,
    limit: Duration,
    retries: usize,
) -> anyhow::Result<FillOutcome> {
    let connections = connect_many(addr, clients).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + limit;
    let handles: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(n, mut client)| {
            let (next, spec) = (next.clone(), spec.clone());
            tokio::spawn(async move {
                let mut rng = Rng::new(0xF111 + n as u64);
                let (mut done, mut errors, mut first_error) = (0usize, 0u64, None);
                while Instant::now() < deadline {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= spec.total() {
                        break;
                    }
                    for attempt in 0..=retries {
                        match send_update(&mut client, spec.request(index, &mut rng)).await {
                            Ok(()) => {
                                done += 1;
                                break;
                            }
                            Err(e) => {
                                errors += 1;
                                first_error.get_or_insert(e);
                                if attempt < retries && Instant::now() < deadline {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                } else {
                                    break;
                                }
                            }
                        }
                    }
                }
                (done, errors, first_error)
            })
        })
        .collect();
    let results = join_all_within(handles, limit + RPC_TIMEOUT * 2, "loading").await?;
    let seconds = started.elapsed().as_secs_f64();
    let mut outcome = FillOutcome {
        affiliates: 0,
        errors: 0,
        first_error: None,
        seconds,
        per_s: 0.0,
    };
    for (done, errors, first_error) in results {
        outcome.affiliates += done;
        outcome.errors += errors;
        if outcome.first_error.is_none() {
            outcome.first_error = first_error;
        }
    }
    outcome.per_s = outcome.affiliates as f64 / seconds.max(1e-9);
    ensure!(
        outcome.affiliates == spec.total(),
        "loaded {} of {} affiliates in {seconds:.1} s ({} errors, first: {})",
        outcome.affiliates,
        spec.total(),
        outcome.errors,
        outcome.first_error.as_deref().unwrap_or("none")
    );
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------------
// Phase 1: update cost.

const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPED: u8 = 2;

#[derive(Debug, Serialize)]
struct UpdateRun {
    server: String,
    window_s: f64,
    updates: u64,
    errors: u64,
    first_error: Option<String>,
    updates_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_s: f64,
    cpu_us_per_update: f64,
    /// CPU time this bench (the clients) used in the window.
    bench_cpu_s: f64,
    /// CPU time every other process on the machine used in the window (interference).
    other_cpu_s: f64,
}

#[derive(Debug, Serialize)]
struct UpdateRound {
    ours: UpdateRun,
    bare: UpdateRun,
    cpu_ratio: f64,
}

#[derive(Debug, Serialize)]
struct UpdateReport {
    config: UpdateConfig,
    rounds: Vec<UpdateRound>,
    /// Pooled over every round: total server CPU time / total updates.
    ours_cpu_us_per_update: f64,
    bare_cpu_us_per_update: f64,
    cpu_ratio: f64,
    round_ratio_min: f64,
    round_ratio_max: f64,
    target_cpu_ratio: f64,
    met: bool,
}

struct ClientTally {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

/// One phase-1 client: one affiliate, fresh random data every request, until told to stop.
async fn update_client(
    index: usize,
    mut client: ClusterClient<Channel>,
    config: UpdateConfig,
    state: Arc<AtomicU8>,
    measured: Arc<AtomicU64>,
    hard_limit: Duration,
) -> ClientTally {
    let mut rng = Rng::new(index as u64 + 1);
    let cluster_id = format!("bench-update-{}", index % config.clusters);
    let affiliate_id = format!("node-{index:03}");
    let endpoints = endpoints_for(index as u64);
    let mut tally = ClientTally {
        latencies: Vec::with_capacity(64 * 1024),
        errors: 0,
        first_error: None,
    };
    let started = Instant::now();
    while state.load(Ordering::Relaxed) != STOPPED && started.elapsed() < hard_limit {
        let len = rng.range(config.data_min, config.data_max);
        let request = update_request(
            &cluster_id,
            &affiliate_id,
            rng.bytes(len),
            endpoints.clone(),
        );
        let sent = Instant::now();
        let result = send_update(&mut client, request).await;
        let latency = sent.elapsed();
        match result {
            Ok(()) if state.load(Ordering::Relaxed) == MEASURING => {
                tally.latencies.push(latency);
                measured.fetch_add(1, Ordering::Relaxed);
            }
            Ok(()) => {}
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
                // Do not spin on a failing server.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}

/// Runs the update load against one server and measures its CPU time over the window.
async fn measure_updates(
    server: &ServerProcess,
    config: &UpdateConfig,
    clk_tck: u64,
) -> anyhow::Result<UpdateRun> {
    let (run, _) = measure_updates_on(
        &server.name,
        &[server.addr],
        &[server.pid()],
        &[],
        config,
        clk_tck,
    )
    .await?;
    Ok(run)
}

/// CPU ticks of several processes together.
fn proc_cpu_ticks_sum(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|&pid| proc_cpu_ticks(pid)).sum()
}

/// Runs the update load against several servers (client `i` talks to `addrs[i % len]`) and
/// measures the CPU time of `pids` together over the window (the run's server CPU), and that of
/// `side_pids` (such as etcd) apart: it is returned, and left out of the other processes' CPU.
async fn measure_updates_on(
    name: &str,
    addrs: &[SocketAddr],
    pids: &[u32],
    side_pids: &[u32],
    config: &UpdateConfig,
    clk_tck: u64,
) -> anyhow::Result<(UpdateRun, f64)> {
    let mut clients = Vec::with_capacity(config.clients);
    for i in 0..config.clients {
        clients.push(connect(addrs[i % addrs.len()]).await?);
    }
    let state = Arc::new(AtomicU8::new(WARMING));
    let measured = Arc::new(AtomicU64::new(0));
    let (warmup, window) = (
        Duration::from_secs_f64(config.warmup_s),
        Duration::from_secs_f64(config.window_s),
    );
    let hard_limit = warmup + window + Duration::from_secs(30);
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            tokio::spawn(update_client(
                i,
                client,
                config.clone(),
                state.clone(),
                measured.clone(),
                hard_limit,
            ))
        })
        .collect();

    tokio::time::sleep(warmup).await;
    let bench_pid = std::process::id();
    let (machine_before, bench_before) = (machine_busy_ticks()?, proc_cpu_ticks(bench_pid)?);
    let cpu_before = proc_cpu_ticks_sum(pids)?;
    let side_before = proc_cpu_ticks_sum(side_pids)?;
    let started = Instant::now();
    state.store(MEASURING, Ordering::SeqCst);
    while started.elapsed() < window && measured.load(Ordering::Relaxed) < config.max_updates {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    state.store(STOPPED, Ordering::SeqCst);
    let elapsed = started.elapsed();
    let cpu_after = proc_cpu_ticks_sum(pids)?;
    let side_after = proc_cpu_ticks_sum(side_pids)?;
    let (machine_after, bench_after) = (machine_busy_ticks()?, proc_cpu_ticks(bench_pid)?);
    let updates = measured.load(Ordering::SeqCst);

    let tallies = join_all_within(handles, RPC_TIMEOUT * 2, "update client").await?;
    let mut latencies: Vec<Duration> = Vec::with_capacity(updates as usize);
    let (mut errors, mut first_error) = (0, None);
    for tally in tallies {
        latencies.extend(tally.latencies);
        errors += tally.errors;
        if first_error.is_none() {
            first_error = tally.first_error;
        }
    }
    latencies.sort_unstable();
    let ticks = |before: u64, after: u64| after.saturating_sub(before) as f64 / clk_tck as f64;
    let cpu_s = ticks(cpu_before, cpu_after);
    let bench_cpu_s = ticks(bench_before, bench_after);
    let side_cpu_s = ticks(side_before, side_after);
    let other_cpu_s =
        (ticks(machine_before, machine_after) - cpu_s - bench_cpu_s - side_cpu_s).max(0.0);
    let run = UpdateRun {
        server: name.to_owned(),
        window_s: elapsed.as_secs_f64(),
        updates,
        errors,
        first_error,
        updates_per_s: updates as f64 / elapsed.as_secs_f64(),
        p50_ms: ms(percentile(&latencies, 0.50)),
        p99_ms: ms(percentile(&latencies, 0.99)),
        max_ms: ms(latencies.last().copied().unwrap_or_default()),
        cpu_s,
        cpu_us_per_update: cpu_s * 1e6 / updates.max(1) as f64,
        bench_cpu_s,
        other_cpu_s,
    };
    Ok((run, side_cpu_s))
}

async fn measure_ours(settings: &Settings, clk_tck: u64) -> anyhow::Result<UpdateRun> {
    let mut server =
        ServerProcess::discovery(settings, &["--snapshots-enabled=false".to_owned()], "warn")?;
    server.wait_accepting(START_TIMEOUT).await?;
    measure_updates(&server, &settings.update, clk_tck).await
}

async fn measure_bare(settings: &Settings, clk_tck: u64) -> anyhow::Result<UpdateRun> {
    let mut server = ServerProcess::bare()?;
    server.wait_accepting(START_TIMEOUT).await?;
    measure_updates(&server, &settings.update, clk_tck).await
}

fn print_update_run(run: &UpdateRun, round: usize, out: &Out) {
    out.say(&format!(
        "  {:>5} {:<18} {:>9} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>6} {:>13.2} {:>9.2} {:>9.2}",
        round,
        run.server,
        run.updates,
        run.updates_per_s,
        run.p50_ms,
        run.p99_ms,
        run.max_ms,
        run.errors,
        run.cpu_us_per_update,
        run.bench_cpu_s,
        run.other_cpu_s
    ));
    if let Some(error) = &run.first_error {
        out.say(&format!("    first error from {}: {error}", run.server));
    }
}

async fn phase_update(
    settings: &Settings,
    clk_tck: u64,
    out: &Out,
) -> anyhow::Result<UpdateReport> {
    let config = &settings.update;
    out.say(&format!(
        "== Phase 1: update cost ({} clients on their own connections, {} clusters, data {}-{} B, 2x{} B endpoints; {} round(s) of {:.1} s warm-up + {:.1} s measured per server)",
        config.clients,
        config.clusters,
        config.data_min,
        config.data_max,
        ENDPOINT_BYTES,
        config.rounds,
        config.warmup_s,
        config.window_s
    ));
    out.say(&format!(
        "  {:>5} {:<18} {:>9} {:>10} {:>8} {:>8} {:>8} {:>6} {:>13} {:>9} {:>9}",
        "round",
        "server",
        "updates",
        "updates/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "CPU us/update",
        "bench s",
        "others s"
    ));
    let mut rounds = Vec::with_capacity(config.rounds);
    for round in 1..=config.rounds {
        // Alternate the order so that drift on the machine does not favour one server.
        let (ours, bare) = if round % 2 == 1 {
            let ours = measure_ours(settings, clk_tck).await?;
            (ours, measure_bare(settings, clk_tck).await?)
        } else {
            let bare = measure_bare(settings, clk_tck).await?;
            (measure_ours(settings, clk_tck).await?, bare)
        };
        print_update_run(&ours, round, out);
        print_update_run(&bare, round, out);
        let cpu_ratio = ours.cpu_us_per_update / bare.cpu_us_per_update.max(1e-9);
        rounds.push(UpdateRound {
            ours,
            bare,
            cpu_ratio,
        });
    }
    let pooled = |run: fn(&UpdateRound) -> &UpdateRun| {
        let cpu: f64 = rounds.iter().map(|r| run(r).cpu_s).sum();
        let updates: u64 = rounds.iter().map(|r| run(r).updates).sum();
        cpu * 1e6 / updates.max(1) as f64
    };
    let (ours_cpu, bare_cpu) = (pooled(|r| &r.ours), pooled(|r| &r.bare));
    let cpu_ratio = ours_cpu / bare_cpu.max(1e-9);
    let ratios = rounds.iter().map(|r| r.cpu_ratio);
    let round_ratio_min = ratios.clone().fold(f64::INFINITY, f64::min);
    let round_ratio_max = ratios.fold(0.0, f64::max);
    let errors: u64 = rounds.iter().map(|r| r.ours.errors + r.bare.errors).sum();
    let met = cpu_ratio <= TARGET_CPU_RATIO && errors == 0;
    out.say(
        "  (bench s / others s: CPU seconds the clients / all other processes used in the window)",
    );
    out.say(&format!(
        "  CPU per update over all rounds: ours {ours_cpu:.2} us, bare {bare_cpu:.2} us; ours / bare {cpu_ratio:.3}x (rounds {round_ratio_min:.3}x-{round_ratio_max:.3}x) (target <= {TARGET_CPU_RATIO}x): {}",
        verdict(met)
    ));
    Ok(UpdateReport {
        config: config.clone(),
        rounds,
        ours_cpu_us_per_update: ours_cpu,
        bare_cpu_us_per_update: bare_cpu,
        cpu_ratio,
        round_ratio_min,
        round_ratio_max,
        target_cpu_ratio: TARGET_CPU_RATIO,
        met,
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 2: fan-out at a full cluster.

#[derive(Debug, Default)]
struct WatcherOutcome {
    snapshot_at: Option<Instant>,
    snapshot_affiliates: usize,
    snapshot_bytes: usize,
    arrivals: Vec<(u64, Instant)>,
    /// How the stream ended, when it ended before the bench stopped it.
    ended: Option<String>,
}

/// Counters the watchers share with the phase driver.
#[derive(Default)]
struct WatchProgress {
    /// Watchers that hold their snapshot or will never get one.
    settled: AtomicUsize,
    /// Watchers that will receive nothing more (got every update, or their stream ended).
    done: AtomicUsize,
}

/// One watcher: records when its snapshot arrives and when each sequenced update arrives.
/// Having received every update it keeps its stream open until `stop`, so that closing it
/// costs no CPU while other watchers are still waiting for that update.
async fn watcher(
    mut client: ClusterClient<Channel>,
    cluster_id: String,
    expected_updates: usize,
    measure_size: bool,
    progress: Arc<WatchProgress>,
    stop: CancellationToken,
) -> WatcherOutcome {
    let settled = &progress.settled;
    let mut outcome = WatcherOutcome::default();
    let opened = tokio::select! {
        opened = client.watch(WatchRequest { cluster_id }) => opened,
        _ = stop.cancelled() => {
            settled.fetch_add(1, Ordering::SeqCst);
            return outcome;
        }
    };
    let mut stream = match opened {
        Ok(response) => response.into_inner(),
        Err(status) => {
            outcome.ended = Some(format!("{:?}", status.code()));
            settled.fetch_add(1, Ordering::SeqCst);
            progress.done.fetch_add(1, Ordering::SeqCst);
            return outcome;
        }
    };
    let mut complete = false;
    // One message per update plus the snapshot, at most.
    for _ in 0..=expected_updates {
        let next = tokio::select! {
            next = stream.message() => next,
            _ = stop.cancelled() => break,
        };
        let now = Instant::now();
        match next {
            Ok(Some(message)) if outcome.snapshot_at.is_none() => {
                outcome.snapshot_at = Some(now);
                outcome.snapshot_affiliates = message.affiliates.len();
                if measure_size {
                    outcome.snapshot_bytes = message.encoded_len();
                }
                settled.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Some(message)) => {
                outcome.arrivals.extend(
                    message
                        .affiliates
                        .iter()
                        .filter_map(|a| sequence_of(&a.data))
                        .map(|seq| (seq, now)),
                );
                if outcome.arrivals.len() >= expected_updates {
                    complete = true;
                    break;
                }
            }
            Ok(None) => {
                outcome.ended = Some("ended without status".to_owned());
                break;
            }
            Err(status) => {
                outcome.ended = Some(format!("{:?}", status.code()));
                break;
            }
        }
    }
    if outcome.snapshot_at.is_none() && outcome.ended.is_some() {
        settled.fetch_add(1, Ordering::SeqCst);
    }
    progress.done.fetch_add(1, Ordering::SeqCst);
    if complete {
        stop.cancelled().await;
    }
    drop(stream);
    outcome
}

#[derive(Debug, Serialize)]
struct FanoutReport {
    config: FanoutConfig,
    fill: FillOutcome,
    snapshot_bytes: usize,
    snapshots_received: usize,
    snapshots_complete: usize,
    snapshot_p50_s: f64,
    snapshot_all_s: f64,
    updates_sent: usize,
    update_errors: u64,
    send_rate_per_s: f64,
    updates_fully_delivered: usize,
    delay_p50_ms: f64,
    delay_p99_ms: f64,
    delay_max_ms: f64,
    /// Sequence numbers (send order, from 0) of the three slowest updates, slowest first.
    slowest_updates: Vec<usize>,
    /// CPU time per update while updates were flowing: the server's, and this bench's (the
    /// watchers' receiving and decoding), which share the machine.
    server_cpu_ms_per_update: f64,
    bench_cpu_ms_per_update: f64,
    /// CPU seconds every other process on the machine used meanwhile (interference).
    others_cpu_s: f64,
    deliveries_expected: usize,
    deliveries_received: usize,
    deliveries_missed: usize,
    stream_errors: BTreeMap<String, usize>,
    rss_after_fill_mib: f64,
    peak_rss_sampled_mib: f64,
    peak_rss_hwm_mib: f64,
    snapshot_met: bool,
    delay_met: bool,
    missed_met: bool,
    rss_met: bool,
}

/// Sends the paced, sequenced updates; returns when each was sent and the errors.
async fn send_paced(
    mut client: ClusterClient<Channel>,
    spec: &FillSpec,
    config: &FanoutConfig,
) -> (Vec<Instant>, u64, Option<String>, Duration) {
    let mut rng = Rng::new(0x5EED);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate_per_s));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut sent_at, mut errors, mut first_error) = (Vec::with_capacity(config.updates), 0, None);
    let started = Instant::now();
    for seq in 0..config.updates {
        ticker.tick().await;
        let affiliate = seq % config.affiliates;
        let request = update_request(
            &spec.cluster_id(0),
            &FillSpec::affiliate_id(affiliate),
            sequenced_data(seq as u64, config.record_bytes, &mut rng),
            endpoints_for(affiliate as u64),
        );
        sent_at.push(Instant::now());
        if let Err(e) = send_update(&mut client, request).await {
            errors += 1;
            first_error.get_or_insert(e);
        }
    }
    (sent_at, errors, first_error, started.elapsed())
}

async fn phase_fanout(
    settings: &Settings,
    clk_tck: u64,
    out: &Out,
) -> anyhow::Result<FanoutReport> {
    let config = settings.fanout.clone();
    out.say(&format!(
        "== Phase 2: fan-out ({} affiliates of {} B in one cluster, {} watchers over {} connections, {} updates at {}/s)",
        config.affiliates, config.record_bytes, config.watchers, config.connections, config.updates, config.rate_per_s
    ));
    let mut server =
        ServerProcess::discovery(settings, &["--snapshots-enabled=false".to_owned()], "info")?;
    let rss = RssSampler::start(server.pid());
    server.wait_accepting(START_TIMEOUT).await?;
    let pid = server.pid();

    let spec = FillSpec {
        cluster_prefix: "bench-fanout",
        clusters: 1,
        per_cluster: config.affiliates,
        record_bytes: config.record_bytes,
    };
    let fill_outcome = fill(
        server.addr,
        config.fill_clients.min(config.affiliates),
        &spec,
        Duration::from_secs(300),
    )
    .await?;
    let rss_after_fill = proc_status_kib(pid, "VmRSS")?;
    out.say(&format!(
        "  filled {} affiliates in {:.2} s; server RSS {:.1} MiB",
        fill_outcome.affiliates,
        fill_outcome.seconds,
        mib(rss_after_fill)
    ));

    // Connections first, then every stream at once.
    let connections = connect_many(server.addr, config.connections).await?;
    let sender = connect(server.addr).await?;
    let progress = Arc::new(WatchProgress::default());
    let stop = CancellationToken::new();
    let opened_at = Instant::now();
    let handles: Vec<_> = (0..config.watchers)
        .map(|i| {
            tokio::spawn(watcher(
                connections[i % config.connections].clone(),
                spec.cluster_id(0),
                config.updates,
                i == 0,
                progress.clone(),
                stop.clone(),
            ))
        })
        .collect();
    drop(connections);
    let snapshot_wait = Duration::from_secs(60);
    while progress.settled.load(Ordering::SeqCst) < config.watchers
        && opened_at.elapsed() < snapshot_wait
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    if progress.settled.load(Ordering::SeqCst) < config.watchers {
        out.say(&format!(
            "  only {} of {} watchers settled within {snapshot_wait:?}; sending updates anyway",
            progress.settled.load(Ordering::SeqCst),
            config.watchers
        ));
    }

    let cpu_before = (
        proc_cpu_ticks(pid)?,
        proc_cpu_ticks(std::process::id())?,
        machine_busy_ticks()?,
    );
    let (sent_at, update_errors, first_update_error, send_elapsed) =
        send_paced(sender, &spec, &config).await;
    if let Some(error) = &first_update_error {
        out.say(&format!("  first update error: {error}"));
    }
    // Every watcher is done, or the grace period is over: stop them all together.
    let (grace, waited) = (Duration::from_secs_f64(config.grace_s), Instant::now());
    while progress.done.load(Ordering::SeqCst) < config.watchers && waited.elapsed() < grace {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cpu_after = (
        proc_cpu_ticks(pid)?,
        proc_cpu_ticks(std::process::id())?,
        machine_busy_ticks()?,
    );
    stop.cancel();
    let outcomes = join_all_within(handles, Duration::from_secs(30), "watcher").await?;
    let peak_sampled = rss.finish().await;
    let hwm = proc_status_kib(pid, "VmHWM")?;
    drop(server);

    // Snapshots.
    let snapshot_times: Vec<Duration> = {
        let mut times: Vec<_> = outcomes
            .iter()
            .filter_map(|o| o.snapshot_at)
            .map(|at| at - opened_at)
            .collect();
        times.sort_unstable();
        times
    };
    let snapshots_received = snapshot_times.len();
    let snapshots_complete = outcomes
        .iter()
        .filter(|o| o.snapshot_affiliates == config.affiliates)
        .count();
    let snapshot_all = snapshot_times.last().copied().unwrap_or_default();
    let snapshot_bytes = outcomes.iter().map(|o| o.snapshot_bytes).max().unwrap_or(0);

    // Deliveries: per update, the latest arrival over every watcher.
    let mut latest: Vec<Option<Instant>> = vec![None; config.updates];
    let mut receivers = vec![0usize; config.updates];
    let mut stream_errors: BTreeMap<String, usize> = BTreeMap::new();
    for outcome in &outcomes {
        for &(seq, at) in &outcome.arrivals {
            let Some(slot) = latest.get_mut(seq as usize) else {
                continue;
            };
            *slot = Some(slot.map_or(at, |t| t.max(at)));
            receivers[seq as usize] += 1;
        }
        if let Some(ended) = &outcome.ended {
            *stream_errors.entry(ended.clone()).or_default() += 1;
        }
    }
    let by_seq: Vec<(usize, Duration)> = (0..sent_at.len())
        .filter(|&seq| receivers[seq] == config.watchers)
        .filter_map(|seq| latest[seq].map(|at| (seq, at.saturating_duration_since(sent_at[seq]))))
        .collect();
    let slowest_updates: Vec<usize> = {
        let mut ranked = by_seq.clone();
        ranked.sort_unstable_by_key(|&(_, delay)| std::cmp::Reverse(delay));
        ranked.iter().take(3).map(|&(seq, _)| seq).collect()
    };
    let mut delays: Vec<Duration> = by_seq.iter().map(|&(_, delay)| delay).collect();
    delays.sort_unstable();
    let deliveries_expected = config.updates * config.watchers;
    let deliveries_received: usize = receivers.iter().sum();
    let deliveries_missed = deliveries_expected.saturating_sub(deliveries_received);
    let peak = peak_sampled.max(hwm);
    let cpu_ms_per_update = |before: u64, after: u64| {
        after.saturating_sub(before) as f64 * 1e3 / clk_tck as f64 / sent_at.len().max(1) as f64
    };

    let report = FanoutReport {
        snapshot_bytes,
        snapshots_received,
        snapshots_complete,
        snapshot_p50_s: percentile(&snapshot_times, 0.5).as_secs_f64(),
        snapshot_all_s: snapshot_all.as_secs_f64(),
        updates_sent: sent_at.len(),
        update_errors,
        send_rate_per_s: sent_at.len() as f64 / send_elapsed.as_secs_f64().max(1e-9),
        updates_fully_delivered: delays.len(),
        delay_p50_ms: ms(percentile(&delays, 0.5)),
        delay_p99_ms: ms(percentile(&delays, 0.99)),
        delay_max_ms: ms(delays.last().copied().unwrap_or_default()),
        slowest_updates,
        server_cpu_ms_per_update: cpu_ms_per_update(cpu_before.0, cpu_after.0),
        bench_cpu_ms_per_update: cpu_ms_per_update(cpu_before.1, cpu_after.1),
        others_cpu_s: (cpu_after.2 - cpu_before.2)
            .saturating_sub(cpu_after.0 - cpu_before.0)
            .saturating_sub(cpu_after.1 - cpu_before.1) as f64
            / clk_tck as f64,
        deliveries_expected,
        deliveries_received,
        deliveries_missed,
        rss_after_fill_mib: mib(rss_after_fill),
        peak_rss_sampled_mib: mib(peak_sampled),
        peak_rss_hwm_mib: mib(hwm),
        snapshot_met: snapshots_complete == config.watchers && snapshot_all <= TARGET_SNAPSHOT_ALL,
        delay_met: delays.len() == config.updates && percentile(&delays, 0.99) <= TARGET_FANOUT_P99,
        missed_met: deliveries_missed == 0 && stream_errors.is_empty() && update_errors == 0,
        rss_met: peak <= TARGET_PEAK_RSS_KIB,
        stream_errors,
        fill: fill_outcome,
        config,
    };
    print_fanout(&report, out);
    Ok(report)
}

fn print_fanout(r: &FanoutReport, out: &Out) {
    out.say(&format!(
        "  snapshots: {} of {} received, {} with all {} affiliates ({:.2} MB each); p50 {:.3} s, all within {:.3} s (target <= {} s): {}",
        r.snapshots_received,
        r.config.watchers,
        r.snapshots_complete,
        r.config.affiliates,
        r.snapshot_bytes as f64 / 1e6,
        r.snapshot_p50_s,
        r.snapshot_all_s,
        TARGET_SNAPSHOT_ALL.as_secs(),
        verdict(r.snapshot_met)
    ));
    out.say(&format!(
        "  updates: {} sent at {:.1}/s, {} errors; {} reached every watcher",
        r.updates_sent, r.send_rate_per_s, r.update_errors, r.updates_fully_delivered
    ));
    out.say(&format!(
        "  send -> received by all watchers: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (slowest updates: {:?}) (target p99 <= {} ms): {}",
        r.delay_p50_ms,
        r.delay_p99_ms,
        r.delay_max_ms,
        r.slowest_updates,
        TARGET_FANOUT_P99.as_millis(),
        verdict(r.delay_met)
    ));
    out.say(&format!(
        "  CPU per update while fanning out: server {:.2} ms, bench (watchers decoding) {:.2} ms; other processes used {:.2} CPU s meanwhile",
        r.server_cpu_ms_per_update, r.bench_cpu_ms_per_update, r.others_cpu_s
    ));
    let errors = if r.stream_errors.is_empty() {
        "none".to_owned()
    } else {
        r.stream_errors
            .iter()
            .map(|(code, n)| format!("{n}x {code}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.say(&format!(
        "  deliveries: {} of {} received, {} missed; streams ended early: {errors} (target: nothing missed): {}",
        r.deliveries_received,
        r.deliveries_expected,
        r.deliveries_missed,
        verdict(r.missed_met)
    ));
    out.say(&format!(
        "  server RSS: {:.1} MiB after fill, peak {:.1} MiB sampled / {:.1} MiB VmHWM (target <= {} MiB): {}",
        r.rss_after_fill_mib,
        r.peak_rss_sampled_mib,
        r.peak_rss_hwm_mib,
        TARGET_PEAK_RSS_KIB / 1024,
        verdict(r.rss_met)
    ));
}

// ---------------------------------------------------------------------------------------------
// Phase 3: scale, snapshot write and load.

#[derive(Debug, Serialize)]
struct ScaleReport {
    config: ScaleConfig,
    affiliates: usize,
    load: FillOutcome,
    rss_empty_mib: f64,
    rss_loaded_mib: f64,
    bytes_per_affiliate: f64,
    payload_bytes_per_affiliate: usize,
    overhead_bytes_per_affiliate: f64,
    overhead_met: bool,
    snapshot_file_bytes: u64,
    shutdown_s: f64,
    /// Largest server RSS seen between SIGTERM and exit (the final snapshot is built then).
    shutdown_peak_rss_mib: f64,
    snapshot_write_logged_ms: Option<u64>,
    final_snapshot_logged: bool,
    restart_accepting_s: f64,
    restart_list_s: f64,
    list_affiliates: usize,
    snapshot_load_logged_ms: Option<u64>,
    snapshot_loaded_affiliates: Option<usize>,
    rss_restarted_mib: f64,
    write_met: bool,
    load_met: bool,
}

async fn phase_scale(settings: &Settings, out: &Out) -> anyhow::Result<ScaleReport> {
    let config = settings.scale.clone();
    let spec = FillSpec {
        cluster_prefix: "bench-scale",
        clusters: config.clusters,
        per_cluster: config.per_cluster,
        record_bytes: config.record_bytes,
    };
    let total = spec.total();
    out.say(&format!(
        "== Phase 3: scale ({} clusters x {} affiliates = {total}, {} B data + 2x{} B endpoints each, {} loading clients)",
        config.clusters, config.per_cluster, config.record_bytes, ENDPOINT_BYTES, config.clients
    ));
    let dir = TempDir::new()?;
    let snapshot_path = dir.0.join("s.snapshot");
    let snapshot_flags = [
        "--snapshots-enabled=true".to_owned(),
        format!("--snapshot-path={}", snapshot_path.display()),
        "--snapshot-interval=1h".to_owned(),
    ];
    // The debug line of the snapshot writer carries its size and duration.
    let rust_log = "info,discovery_server::server=debug";

    let mut server = ServerProcess::discovery(settings, &snapshot_flags, rust_log)?;
    server.wait_accepting(START_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_empty = proc_status_kib(server.pid(), "VmRSS")?;
    let load = fill(server.addr, config.clients, &spec, Duration::from_secs(600)).await?;
    // Connections are closed (the clients are dropped in `fill`); let the server settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_loaded = proc_status_kib(server.pid(), "VmRSS")?;
    let bytes_per_affiliate = rss_loaded.saturating_sub(rss_empty) as f64 * 1024.0 / total as f64;
    let overhead = bytes_per_affiliate - spec.payload_bytes() as f64;
    out.say(&format!(
        "  loaded {total} affiliates in {:.2} s ({:.0}/s, {} errors)",
        load.seconds, load.per_s, load.errors
    ));
    out.say(&format!(
        "  server RSS: {:.1} MiB empty, {:.1} MiB loaded: {bytes_per_affiliate:.0} B per affiliate, {} B payload, overhead {overhead:.0} B (target <= {TARGET_OVERHEAD_BYTES:.0} B): {}",
        mib(rss_empty),
        mib(rss_loaded),
        spec.payload_bytes(),
        verdict(overhead <= TARGET_OVERHEAD_BYTES)
    ));

    let (shutdown, status, shutdown_peak_rss) = server.terminate(Duration::from_secs(60)).await?;
    ensure!(
        status.success(),
        "the server exited with {status} after SIGTERM; its log:\n{}",
        server.log_text()
    );
    let final_snapshot_logged = server.log_line("final snapshot written").is_some();
    let write_ms = server
        .log_line("snapshot written")
        .filter(|line| !line.contains("final snapshot written"))
        .and_then(|line| log_field(&line, "elapsed_ms")?.parse().ok());
    let snapshot_file_bytes = std::fs::metadata(&snapshot_path)
        .with_context(|| format!("no snapshot at {} after shutdown", snapshot_path.display()))?
        .len();
    drop(server);
    out.say(&format!(
        "  SIGTERM -> exit {:.0} ms (final snapshot logged: {}); snapshot write {}; file {:.1} MB; server RSS peaked at {:.1} MiB meanwhile",
        shutdown.as_secs_f64() * 1e3,
        final_snapshot_logged,
        write_ms.map_or("not logged".to_owned(), |ms| format!("{ms} ms (server log)")),
        snapshot_file_bytes as f64 / 1e6,
        mib(shutdown_peak_rss)
    ));

    let started = Instant::now();
    let mut server = ServerProcess::discovery(settings, &snapshot_flags, rust_log)?;
    let accepting = server.wait_accepting(START_TIMEOUT).await?;
    let mut client = connect(server.addr).await?;
    let listed = tokio::time::timeout(
        RPC_TIMEOUT,
        client.list(ListRequest {
            cluster_id: spec.cluster_id(0),
        }),
    )
    .await
    .context("List did not answer in time")??
    .into_inner()
    .affiliates
    .len();
    let list_elapsed = started.elapsed();
    drop(client);
    let loaded_line = server
        .wait_log_line("loaded snapshot", Duration::from_secs(2))
        .await;
    let load_ms: Option<u64> = loaded_line
        .as_deref()
        .and_then(|l| log_field(l, "elapsed_ms")?.parse().ok());
    let loaded_affiliates: Option<usize> = loaded_line
        .as_deref()
        .and_then(|l| log_field(l, "affiliates")?.parse().ok());
    let rss_restarted = proc_status_kib(server.pid(), "VmRSS")?;
    drop(server);
    ensure!(
        listed == config.per_cluster,
        "List after restart returned {listed} affiliates, not {}",
        config.per_cluster
    );
    out.say(&format!(
        "  restart on the snapshot: accepting after {:.0} ms, List of a full cluster ({listed}) after {:.0} ms; snapshot load {} ({} affiliates); RSS {:.1} MiB",
        accepting.as_secs_f64() * 1e3,
        list_elapsed.as_secs_f64() * 1e3,
        load_ms.map_or("not logged".to_owned(), |ms| format!("{ms} ms (server log)")),
        loaded_affiliates.map_or("?".to_owned(), |n| n.to_string()),
        mib(rss_restarted)
    ));
    // Judged by the server's own figure when it logged one, else by the upper bound.
    let write = write_ms.map_or(shutdown, Duration::from_millis);
    let load_time = load_ms.map_or(list_elapsed, Duration::from_millis);
    let write_met = write < TARGET_SNAPSHOT_WRITE;
    let load_met = load_time < TARGET_SNAPSHOT_LOAD && loaded_affiliates == Some(total);
    out.say(&format!(
        "  snapshot write {} ms (upper bound SIGTERM -> exit {:.0} ms), target < {} ms: {}",
        write.as_millis(),
        shutdown.as_secs_f64() * 1e3,
        TARGET_SNAPSHOT_WRITE.as_millis(),
        verdict(write_met)
    ));
    out.say(&format!(
        "  snapshot load {} ms (upper bound start -> List answered {:.0} ms), target < {} ms: {}",
        load_time.as_millis(),
        list_elapsed.as_secs_f64() * 1e3,
        TARGET_SNAPSHOT_LOAD.as_millis(),
        verdict(load_met)
    ));

    Ok(ScaleReport {
        affiliates: total,
        rss_empty_mib: mib(rss_empty),
        rss_loaded_mib: mib(rss_loaded),
        bytes_per_affiliate,
        payload_bytes_per_affiliate: spec.payload_bytes(),
        overhead_bytes_per_affiliate: overhead,
        overhead_met: overhead <= TARGET_OVERHEAD_BYTES,
        snapshot_file_bytes,
        shutdown_s: shutdown.as_secs_f64(),
        shutdown_peak_rss_mib: mib(shutdown_peak_rss),
        snapshot_write_logged_ms: write_ms,
        final_snapshot_logged,
        restart_accepting_s: accepting.as_secs_f64(),
        restart_list_s: list_elapsed.as_secs_f64(),
        list_affiliates: listed,
        snapshot_load_logged_ms: load_ms,
        snapshot_loaded_affiliates: loaded_affiliates,
        rss_restarted_mib: mib(rss_restarted),
        write_met,
        load_met,
        load,
        config,
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 4: replicas on etcd, side by side with the in-memory store.

/// Where etcd comes from when it is missing.
const ETCD_HINT: &str = "the replicas phase needs etcd on PATH (Debian: apt-get install --no-install-recommends etcd-server)";
/// The whole replicas phase gives up after this long (every process it started is killed).
const REPLICAS_PHASE_LIMIT: Duration = Duration::from_secs(30 * 60);

/// `etcd --version`'s first line; fails with a clear message when etcd is missing.
fn etcd_version() -> anyhow::Result<String> {
    let output = Process::new("etcd")
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run `etcd --version`: {ETCD_HINT}"))?;
    ensure!(
        output.status.success(),
        "`etcd --version` failed ({}): {ETCD_HINT}",
        output.status
    );
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("etcd Version:")
        .trim()
        .to_owned())
}

/// One etcd member; killed when dropped.
struct EtcdMember {
    child: Child,
    client_url: String,
    log_path: PathBuf,
}

impl EtcdMember {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An etcd cluster on loopback with free ports and its data in a temporary directory; every
/// member is killed and the directory removed when dropped (members first: fields drop in order).
struct EtcdCluster {
    members: Vec<EtcdMember>,
    _dir: TempDir,
}

impl EtcdCluster {
    async fn start(size: usize) -> anyhow::Result<Self> {
        let dir = TempDir::with_tag("etcd")?;
        let names: Vec<String> = (0..size).map(|i| format!("m{i}")).collect();
        let mut clients = Vec::with_capacity(size);
        let mut peers = Vec::with_capacity(size);
        for _ in 0..size {
            clients.push(format!("http://{}", free_loopback_addr()?));
            peers.push(format!("http://{}", free_loopback_addr()?));
        }
        let initial = names
            .iter()
            .zip(&peers)
            .map(|(n, p)| format!("{n}={p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            let log_path = dir.0.join(format!("{}.log", names[i]));
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("cannot create {}", log_path.display()))?;
            let child = Process::new("etcd")
                .arg(format!("--name={}", names[i]))
                .arg(format!("--data-dir={}", dir.0.join(&names[i]).display()))
                .arg(format!("--listen-client-urls={}", clients[i]))
                .arg(format!("--advertise-client-urls={}", clients[i]))
                .arg(format!("--listen-peer-urls={}", peers[i]))
                .arg(format!("--initial-advertise-peer-urls={}", peers[i]))
                .arg(format!("--initial-cluster={initial}"))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=discovery-bench")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .with_context(|| format!("cannot start etcd: {ETCD_HINT}"))?;
            members.push(EtcdMember {
                child,
                client_url: clients[i].clone(),
                log_path,
            });
        }
        let mut cluster = Self { members, _dir: dir };
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.members.iter().map(EtcdMember::pid).collect()
    }

    /// Waits (bounded) until a write through every member succeeds.
    async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            for (i, member) in self.members.iter_mut().enumerate() {
                if let Some(status) = member.child.try_wait()? {
                    bail!(
                        "etcd member m{i} exited ({status}) while the cluster formed; its log:\n{}",
                        member.log_tail()
                    );
                }
            }
            let mut ready = 0;
            for member in &self.members {
                let options = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(1))
                    .with_timeout(Duration::from_secs(2));
                if let Ok(mut client) =
                    etcd_client::Client::connect([&member.client_url], Some(options)).await
                    && client.put("discovery-bench-probe", "1", None).await.is_ok()
                {
                    ready += 1;
                }
            }
            if ready == self.members.len() {
                return Ok(());
            }
            if started.elapsed() >= limit {
                bail!(
                    "the etcd cluster did not accept writes through every member within {limit:?}; m0's log:\n{}",
                    self.members[0].log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// etcd's watcher and watch stream counts, summed over the members (each member counts the
    /// watches its own clients opened).
    async fn watch_counts(&self) -> anyhow::Result<WatchCounts> {
        let mut counts = WatchCounts::default();
        for member in &self.members {
            let text = http_get_text(&member.client_url, "/metrics").await?;
            counts.watchers += prometheus_value(&text, "etcd_debugging_mvcc_watcher_total")
                .context("no etcd_debugging_mvcc_watcher_total in etcd's /metrics")?;
            counts.streams += prometheus_value(&text, "etcd_debugging_mvcc_watch_stream_total")
                .context("no etcd_debugging_mvcc_watch_stream_total in etcd's /metrics")?;
        }
        Ok(counts)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
struct WatchCounts {
    watchers: f64,
    streams: f64,
}

/// A plain HTTP/1.0 GET of `path` on `base` (`http://host:port`), bounded in time and size.
async fn http_get_text(base: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base
        .strip_prefix("http://")
        .with_context(|| format!("{base} is not an http:// URL"))?;
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(host).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await?;
        let mut body = Vec::new();
        stream.take(16 << 20).read_to_end(&mut body).await?;
        anyhow::Ok(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("GET {base}{path} did not answer within 5 s"))??;
    let text = String::from_utf8_lossy(&body).into_owned();
    ensure!(
        text.starts_with("HTTP/1.") && text.split_whitespace().nth(1) == Some("200"),
        "GET {base}{path}: {}",
        text.lines().next().unwrap_or("no answer")
    );
    Ok(text)
}

/// The value of an unlabelled Prometheus sample.
fn prometheus_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// The servers one side of the comparison runs on.
struct Fleet {
    /// `memory` or `etcd`.
    store: &'static str,
    servers: Vec<ServerProcess>,
    etcd: Option<(EtcdCluster, String)>,
}

impl Fleet {
    fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.addr).collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.servers.iter().map(ServerProcess::pid).collect()
    }

    fn etcd_pids(&self) -> Vec<u32> {
        self.etcd
            .as_ref()
            .map(|(e, _)| e.pids())
            .unwrap_or_default()
    }

    fn label(&self) -> String {
        match &self.etcd {
            None => "memory, 1 server".to_owned(),
            Some((etcd, _)) => format!(
                "etcd, {} replicas + {} members",
                self.servers.len(),
                etcd.members.len()
            ),
        }
    }

    /// Waits (bounded) until every server answers a List of `cluster_id` with `expected`
    /// affiliates (a replica that just started may not follow etcd yet).
    async fn wait_listing(
        &self,
        cluster_id: &str,
        expected: usize,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        for server in &self.servers {
            let mut client = connect(server.addr).await?;
            loop {
                let listed = tokio::time::timeout(
                    RPC_TIMEOUT,
                    client.list(ListRequest {
                        cluster_id: cluster_id.to_owned(),
                    }),
                )
                .await;
                let last = match listed {
                    Ok(Ok(response)) if response.get_ref().affiliates.len() == expected => break,
                    Ok(Ok(response)) => {
                        format!("{} affiliates", response.get_ref().affiliates.len())
                    }
                    Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
                    Err(_) => "no answer".to_owned(),
                };
                if started.elapsed() >= limit {
                    bail!(
                        "{} did not list {expected} affiliates of {cluster_id} within {limit:?} (last: {last}); its log:\n{}",
                        server.name,
                        server.log_text()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }
}

async fn start_memory_fleet(settings: &Settings) -> anyhow::Result<Fleet> {
    let mut server =
        ServerProcess::discovery(settings, &["--snapshots-enabled=false".to_owned()], "info")?;
    server.name = "memory server".to_owned();
    server.wait_accepting(START_TIMEOUT).await?;
    let fleet = Fleet {
        store: "memory",
        servers: vec![server],
        etcd: None,
    };
    fleet
        .wait_listing("discovery-bench-probe", 0, START_TIMEOUT)
        .await?;
    Ok(fleet)
}

async fn start_etcd_fleet(settings: &Settings) -> anyhow::Result<Fleet> {
    let config = &settings.replicas;
    let etcd = EtcdCluster::start(config.etcd_members).await?;
    let prefix = format!("/discovery-bench/{}/", std::process::id());
    let flags = [
        "--store=etcd".to_owned(),
        format!("--etcd-endpoints={}", etcd.client_urls().join(",")),
        format!("--etcd-prefix={prefix}"),
        "--snapshots-enabled=false".to_owned(),
    ];
    let mut servers = Vec::with_capacity(config.replicas);
    for i in 0..config.replicas {
        let mut server = ServerProcess::discovery(settings, &flags, "info")?;
        server.name = format!("replica {i}");
        servers.push(server);
    }
    for server in &mut servers {
        server.wait_accepting(START_TIMEOUT).await?;
    }
    let fleet = Fleet {
        store: "etcd",
        servers,
        etcd: Some((etcd, prefix)),
    };
    fleet
        .wait_listing("discovery-bench-probe", 0, START_TIMEOUT)
        .await?;
    Ok(fleet)
}

#[derive(Debug, Serialize)]
struct ReplicaUpdateRun {
    store: &'static str,
    run: UpdateRun,
    /// CPU time of the etcd members in the window.
    etcd_cpu_s: f64,
    /// Server (replicas summed) and etcd CPU per update.
    server_cpu_us_per_update: f64,
    etcd_cpu_us_per_update: f64,
}

/// Per-update delays of one fan-out, in ms: p50, p99, max over the updates that have the figure.
#[derive(Debug, Default, Serialize)]
struct DelayStats {
    count: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl DelayStats {
    fn of(mut delays: Vec<Duration>) -> Self {
        delays.sort_unstable();
        Self {
            count: delays.len(),
            p50_ms: ms(percentile(&delays, 0.5)),
            p99_ms: ms(percentile(&delays, 0.99)),
            max_ms: ms(delays.last().copied().unwrap_or_default()),
        }
    }

    fn show(&self) -> String {
        format!(
            "p50 {:.2} / p99 {:.2} / max {:.2} ms ({} updates)",
            self.p50_ms, self.p99_ms, self.max_ms, self.count
        )
    }
}

#[derive(Debug, Serialize)]
struct ReplicaFanout {
    store: &'static str,
    servers: usize,
    connections: usize,
    watchers_per_server: Vec<usize>,
    fill_clients: usize,
    fill: FillOutcome,
    snapshots_complete: usize,
    snapshot_all_s: f64,
    updates_sent: usize,
    update_errors: u64,
    first_update_error: Option<String>,
    send_rate_per_s: f64,
    /// Send -> the AffiliateUpdate answer (the write is committed).
    ack: DelayStats,
    /// Send -> the bench's own etcd watch on the prefix sees the data key (etcd only).
    etcd_event: DelayStats,
    /// Send -> the first watcher (any server) has the update.
    first_watcher: DelayStats,
    /// Send -> the first watcher of the server that got it last has it.
    slowest_server_first: DelayStats,
    /// Per update, the largest first-to-last spread among one server's watchers.
    within_server_spread: DelayStats,
    /// Send -> every watcher has it: the figure the target is about.
    all_watchers: DelayStats,
    deliveries_expected: usize,
    deliveries_received: usize,
    deliveries_missed: usize,
    stream_errors: BTreeMap<String, usize>,
    server_cpu_ms_per_update: f64,
    etcd_cpu_ms_per_update: f64,
    bench_cpu_ms_per_update: f64,
    others_cpu_s: f64,
    /// etcd's watch counts (members summed) before the bench's own watch, and the range sampled
    /// every 200 ms during the fan-out (which includes the bench's watch).
    etcd_watch_before: Option<WatchCounts>,
    etcd_watch_min: Option<WatchCounts>,
    etcd_watch_max: Option<WatchCounts>,
    etcd_watch_samples: usize,
    rss_after_fill_mib: Vec<f64>,
    peak_rss_hwm_mib: Vec<f64>,
    etcd_peak_rss_hwm_mib: Vec<f64>,
}

/// The bench's own etcd watch on the replicas' prefix: when each sequenced data key arrives.
async fn etcd_probe(
    endpoints: Vec<String>,
    prefix: String,
    max_events: usize,
    created: tokio::sync::oneshot::Sender<()>,
    stop: CancellationToken,
) -> anyhow::Result<Vec<(u64, Instant)>> {
    let mut client = etcd_client::Client::connect(&endpoints, None).await?;
    let options = etcd_client::WatchOptions::new().with_prefix();
    let mut stream = client.watch(prefix, Some(options)).await?;
    let mut created = Some(created);
    let mut seen = Vec::new();
    // Bounded: at most one response per event expected plus slack.
    for _ in 0..max_events {
        let message = tokio::select! {
            message = stream.message() => message?,
            _ = stop.cancelled() => break,
        };
        let now = Instant::now();
        let Some(response) = message else { break };
        if response.created()
            && let Some(created) = created.take()
        {
            let _ = created.send(());
        }
        for event in response.events() {
            if event.event_type() != etcd_client::EventType::Put {
                continue;
            }
            // A data key's value is its expiry (8 bytes) and then the affiliate data.
            if let Some(seq) = event
                .kv()
                .and_then(|kv| kv.value().get(8..))
                .and_then(sequence_of)
            {
                seen.push((seq, now));
            }
        }
    }
    Ok(seen)
}

/// Samples etcd's watch counts every 200 ms until stopped (at most an hour).
async fn sample_watch_counts(
    fleet_etcd: &EtcdCluster,
    stop: &CancellationToken,
) -> (Option<WatchCounts>, Option<WatchCounts>, usize) {
    let (mut min, mut max, mut samples) = (None::<WatchCounts>, None::<WatchCounts>, 0);
    for _ in 0..18_000 {
        if let Ok(counts) = fleet_etcd.watch_counts().await {
            samples += 1;
            min = Some(min.map_or(counts, |m| WatchCounts {
                watchers: m.watchers.min(counts.watchers),
                streams: m.streams.min(counts.streams),
            }));
            max = Some(max.map_or(counts, |m| WatchCounts {
                watchers: m.watchers.max(counts.watchers),
                streams: m.streams.max(counts.streams),
            }));
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    (min, max, samples)
}

/// The paced, sequenced updates, sent through one server or round-robin; returns when each
/// was sent and answered.
async fn send_paced_over(
    mut clients: Vec<ClusterClient<Channel>>,
    spec: &FillSpec,
    config: &FanoutConfig,
) -> (
    Vec<Instant>,
    Vec<Option<Instant>>,
    u64,
    Option<String>,
    Duration,
) {
    let mut rng = Rng::new(0x5EED);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate_per_s));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent_at = Vec::with_capacity(config.updates);
    let mut acked_at = Vec::with_capacity(config.updates);
    let (mut errors, mut first_error) = (0, None);
    let started = Instant::now();
    let n = clients.len();
    for seq in 0..config.updates {
        ticker.tick().await;
        let affiliate = seq % config.affiliates;
        let request = update_request(
            &spec.cluster_id(0),
            &FillSpec::affiliate_id(affiliate),
            sequenced_data(seq as u64, config.record_bytes, &mut rng),
            endpoints_for(affiliate as u64),
        );
        sent_at.push(Instant::now());
        match send_update(&mut clients[seq % n], request).await {
            Ok(()) => acked_at.push(Some(Instant::now())),
            Err(e) => {
                acked_at.push(None);
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    (sent_at, acked_at, errors, first_error, started.elapsed())
}

/// Fan-out over every server of a fleet: fills one cluster through the first server, spreads
/// the watchers over the servers (connection `c` on server `c % servers`, watcher `i` on
/// connection `i % connections`) and sends the sequenced updates round-robin over the servers
/// (or all through the first with `--replicas-send one`).
async fn fanout_over(
    fleet: &Fleet,
    settings: &Settings,
    clk_tck: u64,
) -> anyhow::Result<ReplicaFanout> {
    let config = settings.fanout.clone();
    let servers = fleet.servers.len();
    let connections = config.connections.div_ceil(servers) * servers;
    let spec = FillSpec {
        cluster_prefix: "bench-replicas",
        clusters: 1,
        per_cluster: config.affiliates,
        record_bytes: config.record_bytes,
    };
    // Creations in one cluster race on etcd (see the report); retried as nodes would.
    let fill_outcome = fill_retrying(
        fleet.servers[0].addr,
        config.fill_clients.min(config.affiliates),
        &spec,
        Duration::from_secs(300),
        100,
    )
    .await?;
    fleet
        .wait_listing(
            &spec.cluster_id(0),
            config.affiliates,
            Duration::from_secs(60),
        )
        .await?;
    let rss_after_fill = fleet
        .pids()
        .iter()
        .map(|&pid| proc_status_kib(pid, "VmRSS").map(mib))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut conns = Vec::with_capacity(connections);
    for c in 0..connections {
        conns.push(connect(fleet.servers[c % servers].addr).await?);
    }
    let mut senders = Vec::new();
    let send_through = if settings.replicas.send_round_robin {
        servers
    } else {
        1
    };
    for server in &fleet.servers[..send_through] {
        senders.push(connect(server.addr).await?);
    }
    let server_of = |watcher: usize| (watcher % connections) % servers;
    let mut watchers_per_server = vec![0usize; servers];
    (0..config.watchers).for_each(|i| watchers_per_server[server_of(i)] += 1);

    // etcd: its watch counts before the bench adds its own watch, then the probe watch.
    let stop = CancellationToken::new();
    let (etcd_watch_before, probe, sampler) = match &fleet.etcd {
        Some((etcd, prefix)) => {
            let before = etcd.watch_counts().await?;
            let (created_tx, created_rx) = tokio::sync::oneshot::channel();
            let probe = tokio::spawn(etcd_probe(
                etcd.client_urls(),
                prefix.clone(),
                config.updates * 4 + 10_000,
                created_tx,
                stop.clone(),
            ));
            tokio::time::timeout(Duration::from_secs(10), created_rx)
                .await
                .context("the bench's etcd watch was not created within 10 s")?
                .context("the bench's etcd watch failed")?;
            (
                Some(before),
                Some(probe),
                Some(sample_watch_counts(etcd, &stop)),
            )
        }
        None => (None, None, None),
    };

    let progress = Arc::new(WatchProgress::default());
    let watch_stop = CancellationToken::new();
    let opened_at = Instant::now();
    let handles: Vec<_> = (0..config.watchers)
        .map(|i| {
            tokio::spawn(watcher(
                conns[i % connections].clone(),
                spec.cluster_id(0),
                config.updates,
                false,
                progress.clone(),
                watch_stop.clone(),
            ))
        })
        .collect();
    drop(conns);

    let drive = async {
        let snapshot_wait = Duration::from_secs(60);
        while progress.settled.load(Ordering::SeqCst) < config.watchers
            && opened_at.elapsed() < snapshot_wait
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let pids = fleet.pids();
        let etcd_pids = fleet.etcd_pids();
        let before = (
            proc_cpu_ticks_sum(&pids)?,
            proc_cpu_ticks_sum(&etcd_pids)?,
            proc_cpu_ticks(std::process::id())?,
            machine_busy_ticks()?,
        );
        let sent = send_paced_over(senders, &spec, &config).await;
        let (grace, waited) = (Duration::from_secs_f64(config.grace_s), Instant::now());
        while progress.done.load(Ordering::SeqCst) < config.watchers && waited.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let after = (
            proc_cpu_ticks_sum(&pids)?,
            proc_cpu_ticks_sum(&etcd_pids)?,
            proc_cpu_ticks(std::process::id())?,
            machine_busy_ticks()?,
        );
        stop.cancel();
        anyhow::Ok((sent, before, after))
    };
    // The sampler runs alongside the driver and ends when the driver cancels `stop`.
    let (driven, samples) = match sampler {
        Some(sampler) => {
            let (driven, samples) = tokio::join!(drive, sampler);
            (driven, Some(samples))
        }
        None => (drive.await, None),
    };
    stop.cancel();
    watch_stop.cancel();
    let outcomes = join_all_within(handles, Duration::from_secs(30), "watcher").await?;
    let probe_seen = match probe {
        Some(probe) => tokio::time::timeout(Duration::from_secs(10), probe)
            .await
            .context("the bench's etcd watch did not stop")?
            .context("the bench's etcd watch task failed")??,
        None => Vec::new(),
    };
    let ((sent_at, acked_at, update_errors, first_update_error, send_elapsed), before, after) =
        driven?;

    let updates = sent_at.len();
    let snapshots_complete = outcomes
        .iter()
        .filter(|o| o.snapshot_affiliates == config.affiliates)
        .count();
    let snapshot_all = outcomes
        .iter()
        .filter_map(|o| o.snapshot_at)
        .map(|at| at - opened_at)
        .max()
        .unwrap_or_default();
    // Per update and server: first and last arrival, and receivers.
    let mut first: Vec<Vec<Option<Instant>>> = vec![vec![None; servers]; updates];
    let mut last: Vec<Vec<Option<Instant>>> = vec![vec![None; servers]; updates];
    let mut receivers = vec![0usize; updates];
    let mut stream_errors: BTreeMap<String, usize> = BTreeMap::new();
    for (i, outcome) in outcomes.iter().enumerate() {
        let server = server_of(i);
        for &(seq, at) in &outcome.arrivals {
            let seq = seq as usize;
            if seq >= updates {
                continue;
            }
            let f = &mut first[seq][server];
            *f = Some(f.map_or(at, |t| t.min(at)));
            let l = &mut last[seq][server];
            *l = Some(l.map_or(at, |t| t.max(at)));
            receivers[seq] += 1;
        }
        if let Some(ended) = &outcome.ended {
            *stream_errors.entry(ended.clone()).or_default() += 1;
        }
    }
    let complete: Vec<usize> = (0..updates)
        .filter(|&seq| receivers[seq] == config.watchers)
        .collect();
    let since = |seq: usize, at: Instant| at.saturating_duration_since(sent_at[seq]);
    let all_watchers = DelayStats::of(
        complete
            .iter()
            .filter_map(|&s| last[s].iter().flatten().max().map(|&at| since(s, at)))
            .collect(),
    );
    let first_watcher = DelayStats::of(
        (0..updates)
            .filter_map(|s| first[s].iter().flatten().min().map(|&at| since(s, at)))
            .collect(),
    );
    let slowest_server_first = DelayStats::of(
        complete
            .iter()
            .filter_map(|&s| first[s].iter().flatten().max().map(|&at| since(s, at)))
            .collect(),
    );
    let within_server_spread = DelayStats::of(
        complete
            .iter()
            .map(|&s| {
                (0..servers)
                    .filter_map(|r| Some(last[s][r]? - first[s][r]?))
                    .max()
                    .unwrap_or_default()
            })
            .collect(),
    );
    let ack = DelayStats::of(
        (0..updates)
            .filter_map(|s| acked_at[s].map(|at| since(s, at)))
            .collect(),
    );
    let mut probe_first: Vec<Option<Instant>> = vec![None; updates];
    for (seq, at) in probe_seen {
        if let Some(slot) = probe_first.get_mut(seq as usize) {
            slot.get_or_insert(at);
        }
    }
    let etcd_event = DelayStats::of(
        (0..updates)
            .filter_map(|s| probe_first[s].map(|at| since(s, at)))
            .collect(),
    );
    let deliveries_expected = updates * config.watchers;
    let deliveries_received: usize = receivers.iter().sum();
    let per_update =
        |b: u64, a: u64| a.saturating_sub(b) as f64 * 1e3 / clk_tck as f64 / updates.max(1) as f64;
    let used = |b: u64, a: u64| a.saturating_sub(b);
    let others_ticks = used(before.3, after.3)
        .saturating_sub(used(before.0, after.0))
        .saturating_sub(used(before.1, after.1))
        .saturating_sub(used(before.2, after.2));
    let hwm = |pids: Vec<u32>| {
        pids.iter()
            .map(|&pid| proc_status_kib(pid, "VmHWM").map(mib))
            .collect::<anyhow::Result<Vec<_>>>()
    };
    let (etcd_watch_min, etcd_watch_max, etcd_watch_samples) = samples.unwrap_or_default();
    Ok(ReplicaFanout {
        store: fleet.store,
        servers,
        connections,
        watchers_per_server,
        fill_clients: config.fill_clients.min(config.affiliates),
        fill: fill_outcome,
        snapshots_complete,
        snapshot_all_s: snapshot_all.as_secs_f64(),
        updates_sent: updates,
        update_errors,
        first_update_error,
        send_rate_per_s: updates as f64 / send_elapsed.as_secs_f64().max(1e-9),
        ack,
        etcd_event,
        first_watcher,
        slowest_server_first,
        within_server_spread,
        all_watchers,
        deliveries_expected,
        deliveries_received,
        deliveries_missed: deliveries_expected.saturating_sub(deliveries_received),
        stream_errors,
        server_cpu_ms_per_update: per_update(before.0, after.0),
        etcd_cpu_ms_per_update: per_update(before.1, after.1),
        bench_cpu_ms_per_update: per_update(before.2, after.2),
        others_cpu_s: others_ticks as f64 / clk_tck as f64,
        etcd_watch_before,
        etcd_watch_min,
        etcd_watch_max,
        etcd_watch_samples,
        rss_after_fill_mib: rss_after_fill,
        peak_rss_hwm_mib: hwm(fleet.pids())?,
        etcd_peak_rss_hwm_mib: hwm(fleet.etcd_pids())?,
    })
}

#[derive(Debug, Serialize)]
struct ReplicasReport {
    config: ReplicasConfig,
    etcd_version: String,
    loadavg_before: String,
    loadavg_after: String,
    updates: Vec<ReplicaUpdateRun>,
    memory_fanout: ReplicaFanout,
    etcd_fanout: ReplicaFanout,
    /// Pooled over the rounds: updates/s and CPU per update of each store.
    memory_updates_per_s: f64,
    etcd_updates_per_s: f64,
    memory_cpu_us_per_update: f64,
    etcd_replicas_cpu_us_per_update: f64,
    etcd_members_cpu_us_per_update: f64,
    delay_met: bool,
    missed_met: bool,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn phase_replicas(
    settings: &Settings,
    clk_tck: u64,
    out: &Out,
) -> anyhow::Result<ReplicasReport> {
    let run = phase_replicas_inner(settings, clk_tck, out);
    // Bounded, and interruptible: either way the servers and etcd are dropped (killed) and the
    // temporary directory removed before this returns.
    tokio::select! {
        result = tokio::time::timeout(REPLICAS_PHASE_LIMIT, run) => {
            result.with_context(|| format!("the replicas phase did not finish within {REPLICAS_PHASE_LIMIT:?}"))?
        }
        _ = tokio::signal::ctrl_c() => bail!("interrupted; every server and etcd member started was killed"),
    }
}

async fn phase_replicas_inner(
    settings: &Settings,
    clk_tck: u64,
    out: &Out,
) -> anyhow::Result<ReplicasReport> {
    let config = settings.replicas.clone();
    let etcd_version = etcd_version()?;
    let loadavg_before = loadavg();
    let (u, f) = (&settings.update, &settings.fanout);
    out.say(&format!(
        "== Phase 4: replicas on etcd {etcd_version} ({} replicas, {}-member etcd on loopback, data on {}) side by side with the in-memory store; load average {loadavg_before}",
        config.replicas,
        config.etcd_members,
        std::env::temp_dir().display()
    ));
    let memory = start_memory_fleet(settings).await?;
    let etcd = start_etcd_fleet(settings).await?;
    out.say(&format!(
        "  started: {} (pid {}); {} (pids {:?}, etcd pids {:?})",
        memory.label(),
        memory.servers[0].pid(),
        etcd.label(),
        etcd.pids(),
        etcd.etcd_pids()
    ));

    out.say(&format!(
        "  updates: {} clients (client i on server i % servers), {} clusters, data {}-{} B; {} round(s) of {:.1} s warm-up + {:.1} s measured per store, alternating",
        u.clients, u.clusters, u.data_min, u.data_max, u.rounds, u.warmup_s, u.window_s
    ));
    out.say(&format!(
        "  {:>5} {:<7} {:>8} {:>9} {:>7} {:>7} {:>8} {:>6} {:>12} {:>12} {:>10} {:>9}",
        "round",
        "store",
        "updates",
        "updates/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "server us/up",
        "etcd us/up",
        "bench s",
        "others s"
    ));
    let mut updates = Vec::with_capacity(u.rounds * 2);
    for round in 1..=u.rounds {
        let order: [&Fleet; 2] = if round % 2 == 1 {
            [&memory, &etcd]
        } else {
            [&etcd, &memory]
        };
        for fleet in order {
            let (run, etcd_cpu_s) = measure_updates_on(
                fleet.store,
                &fleet.addrs(),
                &fleet.pids(),
                &fleet.etcd_pids(),
                u,
                clk_tck,
            )
            .await?;
            let per = |cpu_s: f64| cpu_s * 1e6 / run.updates.max(1) as f64;
            let row = ReplicaUpdateRun {
                store: fleet.store,
                server_cpu_us_per_update: per(run.cpu_s),
                etcd_cpu_us_per_update: per(etcd_cpu_s),
                etcd_cpu_s,
                run,
            };
            out.say(&format!(
                "  {:>5} {:<7} {:>8} {:>9.0} {:>7.2} {:>7.2} {:>8.2} {:>6} {:>12.1} {:>12.1} {:>10.2} {:>9.2}",
                round,
                row.store,
                row.run.updates,
                row.run.updates_per_s,
                row.run.p50_ms,
                row.run.p99_ms,
                row.run.max_ms,
                row.run.errors,
                row.server_cpu_us_per_update,
                row.etcd_cpu_us_per_update,
                row.run.bench_cpu_s,
                row.run.other_cpu_s
            ));
            if let Some(error) = &row.run.first_error {
                out.say(&format!("    first error ({}): {error}", row.store));
            }
            updates.push(row);
        }
    }
    let pooled = |store: &str, value: fn(&ReplicaUpdateRun) -> f64| {
        let rows: Vec<_> = updates.iter().filter(|r| r.store == store).collect();
        let n: u64 = rows.iter().map(|r| r.run.updates).sum();
        let secs: f64 = rows.iter().map(|r| r.run.window_s).sum();
        let total: f64 = rows.iter().map(|r| value(r)).sum();
        (n as f64 / secs.max(1e-9), total * 1e6 / n.max(1) as f64)
    };
    let (memory_updates_per_s, memory_cpu) = pooled("memory", |r| r.run.cpu_s);
    let (etcd_updates_per_s, etcd_replicas_cpu) = pooled("etcd", |r| r.run.cpu_s);
    let (_, etcd_members_cpu) = pooled("etcd", |r| r.etcd_cpu_s);
    out.say(&format!(
        "  pooled: memory {memory_updates_per_s:.0} updates/s at {memory_cpu:.1} us server CPU per update; etcd {etcd_updates_per_s:.0} updates/s at {etcd_replicas_cpu:.1} us replica CPU (summed) + {etcd_members_cpu:.1} us etcd CPU per update"
    ));

    out.say(&format!(
        "  fan-out: {} affiliates of {} B in one cluster, {} watchers, {} updates at {}/s sent {}",
        f.affiliates,
        f.record_bytes,
        f.watchers,
        f.updates,
        f.rate_per_s,
        if config.send_round_robin {
            "round-robin over the servers"
        } else {
            "through the first server"
        }
    ));
    let memory_fanout = fanout_over(&memory, settings, clk_tck).await?;
    print_replica_fanout(&memory_fanout, out);
    let etcd_fanout = fanout_over(&etcd, settings, clk_tck).await?;
    print_replica_fanout(&etcd_fanout, out);

    for (fleet, what) in [(&memory, "memory"), (&etcd, "etcd")] {
        for server in &fleet.servers {
            for needle in [" WARN ", " ERROR "] {
                if let Some(line) = server.log_line(needle) {
                    out.say(&format!("  {what}: {} logged: {line}", server.name));
                }
            }
        }
    }
    drop(etcd);
    drop(memory);
    let loadavg_after = loadavg();
    let delay_met = etcd_fanout.all_watchers.count == f.updates
        && etcd_fanout.all_watchers.p99_ms <= ms(TARGET_REPLICA_FANOUT_P99);
    let missed_met = [&memory_fanout, &etcd_fanout]
        .iter()
        .all(|r| r.deliveries_missed == 0 && r.stream_errors.is_empty() && r.update_errors == 0);
    out.say(&format!(
        "  etcd: send -> every watcher p99 {:.2} ms (target <= {} ms): {}; missed deliveries {} (target 0): {}; load average {loadavg_after}",
        etcd_fanout.all_watchers.p99_ms,
        TARGET_REPLICA_FANOUT_P99.as_millis(),
        verdict(delay_met),
        etcd_fanout.deliveries_missed,
        verdict(missed_met)
    ));
    Ok(ReplicasReport {
        config,
        etcd_version,
        loadavg_before,
        loadavg_after,
        updates,
        memory_fanout,
        etcd_fanout,
        memory_updates_per_s,
        etcd_updates_per_s,
        memory_cpu_us_per_update: memory_cpu,
        etcd_replicas_cpu_us_per_update: etcd_replicas_cpu,
        etcd_members_cpu_us_per_update: etcd_members_cpu,
        delay_met,
        missed_met,
    })
}

fn print_replica_fanout(r: &ReplicaFanout, out: &Out) {
    out.say(&format!(
        "  -- {} ({} server(s), {} connections, watchers per server {:?}): filled by {} clients in {:.2} s ({:.0}/s, {} failed attempts retried{}); {} of {} snapshots complete, all within {:.2} s",
        r.store,
        r.servers,
        r.connections,
        r.watchers_per_server,
        r.fill_clients,
        r.fill.seconds,
        r.fill.per_s,
        r.fill.errors,
        r.fill
            .first_error
            .as_deref()
            .map_or(String::new(), |e| format!(", first: {e}")),
        r.snapshots_complete,
        r.watchers_per_server.iter().sum::<usize>(),
        r.snapshot_all_s
    ));
    out.say(&format!(
        "     {} updates sent at {:.1}/s, {} errors{}",
        r.updates_sent,
        r.send_rate_per_s,
        r.update_errors,
        r.first_update_error
            .as_deref()
            .map_or(String::new(), |e| format!(" (first: {e})"))
    ));
    out.say(&format!(
        "     send -> answered:                {}",
        r.ack.show()
    ));
    if r.etcd_event.count > 0 {
        out.say(&format!(
            "     send -> bench's etcd watch sees it: {}",
            r.etcd_event.show()
        ));
    }
    out.say(&format!(
        "     send -> first watcher:           {}",
        r.first_watcher.show()
    ));
    out.say(&format!(
        "     send -> first watcher of the last server: {}",
        r.slowest_server_first.show()
    ));
    out.say(&format!(
        "     first -> last watcher within one server:  {}",
        r.within_server_spread.show()
    ));
    out.say(&format!(
        "     send -> EVERY watcher:           {}",
        r.all_watchers.show()
    ));
    let errors = if r.stream_errors.is_empty() {
        "none".to_owned()
    } else {
        format!("{:?}", r.stream_errors)
    };
    out.say(&format!(
        "     deliveries {} of {}, missed {}; streams ended early: {errors}",
        r.deliveries_received, r.deliveries_expected, r.deliveries_missed
    ));
    out.say(&format!(
        "     CPU per update: servers {:.2} ms, etcd {:.2} ms, bench watchers {:.2} ms; other processes {:.2} CPU s",
        r.server_cpu_ms_per_update, r.etcd_cpu_ms_per_update, r.bench_cpu_ms_per_update, r.others_cpu_s
    ));
    if let (Some(before), Some(min), Some(max)) =
        (r.etcd_watch_before, r.etcd_watch_min, r.etcd_watch_max)
    {
        out.say(&format!(
            "     etcd watchers (members summed): {} ({} streams) before the bench's own watch; {}-{} ({}-{} streams) over {} samples during the fan-out, the bench's 1 included; expected {} (1 root watch per replica) + 1",
            before.watchers,
            before.streams,
            min.watchers,
            max.watchers,
            min.streams,
            max.streams,
            r.etcd_watch_samples,
            r.servers
        ));
    }
    out.say(&format!(
        "     RSS after fill {:?} MiB; peak (VmHWM) per server {:?} MiB; etcd members' VmHWM {:?} MiB",
        r.rss_after_fill_mib.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>(),
        r.peak_rss_hwm_mib.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>(),
        r.etcd_peak_rss_hwm_mib.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>()
    ));
}

// ---------------------------------------------------------------------------------------------
// Report and entry point.

/// Where the human report goes: stdout, or stderr when stdout carries JSON.
struct Out {
    to_stderr: bool,
}

impl Out {
    fn say(&self, line: &str) {
        if self.to_stderr {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

#[derive(Debug, Serialize)]
struct Machine {
    cpus: usize,
    kernel: String,
    cpu_model: String,
    clk_tck: u64,
}

impl Machine {
    fn describe(clk_tck: u64) -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model: read("/proc/cpuinfo")
                .lines()
                .find_map(|l| {
                    l.strip_prefix("model name")?
                        .split_once(':')
                        .map(|(_, v)| v.trim().to_owned())
                })
                .unwrap_or_default(),
            clk_tck,
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    machine: Machine,
    quick: bool,
    update: Option<UpdateReport>,
    fanout: Option<FanoutReport>,
    scale: Option<ScaleReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<ReplicasReport>,
    all_targets_met: bool,
}

impl Report {
    fn targets_met(&self) -> bool {
        self.update.as_ref().is_none_or(|u| u.met)
            && self
                .fanout
                .as_ref()
                .is_none_or(|f| f.snapshot_met && f.delay_met && f.missed_met && f.rss_met)
            && self
                .scale
                .as_ref()
                .is_none_or(|s| s.overhead_met && s.write_met && s.load_met)
            && self
                .replicas
                .as_ref()
                .is_none_or(|r| r.delay_met && r.missed_met)
    }
}

async fn run_bench(args: BenchArgs) -> anyhow::Result<bool> {
    let settings = args.settings()?;
    ensure!(
        settings.server_bin.is_file(),
        "no server binary at {} (build it with `cargo build --release -p discovery-server`, or pass --server-bin)",
        settings.server_bin.display()
    );
    let out = Out {
        to_stderr: args.json,
    };
    let clk_tck = clock_ticks_per_second();
    let machine = Machine::describe(clk_tck);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    out.say(&format!("discovery-bench: {command}"));
    out.say(&format!(
        "machine: {} CPUs ({}), kernel {}, CLK_TCK {}; server {}",
        machine.cpus,
        machine.cpu_model,
        machine.kernel,
        clk_tck,
        settings.server_bin.display()
    ));
    let mut report = Report {
        command,
        machine,
        quick: args.quick,
        update: None,
        fanout: None,
        scale: None,
        replicas: None,
        all_targets_met: false,
    };
    for phase in settings.phases.clone() {
        match phase {
            Phase::Update => report.update = Some(phase_update(&settings, clk_tck, &out).await?),
            Phase::Fanout => report.fanout = Some(phase_fanout(&settings, clk_tck, &out).await?),
            Phase::Scale => report.scale = Some(phase_scale(&settings, &out).await?),
            Phase::Replicas => {
                report.replicas = Some(phase_replicas(&settings, clk_tck, &out).await?);
            }
        }
    }
    report.all_targets_met = report.targets_met();
    out.say(&format!(
        "== all targets met: {}",
        if report.all_targets_met { "yes" } else { "NO" }
    ));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(report.all_targets_met)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.mode {
        Some(Mode::BareServer { addr }) => bare_server(addr).await,
        None => {
            let check = cli.bench.check;
            let met = run_bench(cli.bench).await?;
            if check && !met {
                std::process::exit(2);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let values: Vec<_> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&values, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }

    #[test]
    fn sequence_round_trips() {
        let data = sequenced_data(42, 800, &mut Rng::new(1));
        assert_eq!(data.len(), 800);
        assert_eq!(sequence_of(&data), Some(42));
        assert_eq!(sequence_of(&Rng::new(2).bytes(800)), None);
    }

    #[test]
    fn log_fields_are_found_without_colors() {
        let line = strip_ansi(
            "2026-01-01T00:00:00Z  INFO discovery_server::server: loaded snapshot \u{1b}[3mpath\u{1b}[0m\u{1b}[2m=\u{1b}[0m/tmp/s affiliates=1000 elapsed_ms=12",
        );
        assert_eq!(log_field(&line, "elapsed_ms"), Some("12"));
        assert_eq!(log_field(&line, "affiliates"), Some("1000"));
        assert_eq!(log_field(&line, "path"), Some("/tmp/s"));
        assert_eq!(log_field(&line, "ms"), None);
    }

    #[test]
    fn prometheus_values_are_found_by_exact_name() {
        let text = "# HELP etcd_debugging_mvcc_watcher_total Total number of watchers.\n\
                    # TYPE etcd_debugging_mvcc_watcher_total gauge\n\
                    etcd_debugging_mvcc_watcher_total_x 9\n\
                    etcd_debugging_mvcc_watcher_total 3\n";
        assert_eq!(
            prometheus_value(text, "etcd_debugging_mvcc_watcher_total"),
            Some(3.0)
        );
        assert_eq!(prometheus_value(text, "etcd_missing"), None);
    }

    #[test]
    fn quick_flags_still_yield_to_explicit_ones() {
        let cli = Cli::try_parse_from([
            "discovery-bench",
            "--quick",
            "--update-clients=3",
            "--phases=update,scale",
        ])
        .unwrap();
        let settings = cli.bench.settings().unwrap();
        assert_eq!(settings.update.clients, 3);
        assert_eq!(settings.update.clusters, 2);
        assert_eq!(settings.phases, [Phase::Update, Phase::Scale]);
    }
}
