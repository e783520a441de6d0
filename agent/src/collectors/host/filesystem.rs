//! Size and free space of mounted filesystems: the mount table from /proc/self/mounts, the
//! numbers from statvfs(3).
//!
//! statvfs on a dead network mount (NFS, CIFS) can block for minutes, so it runs on a worker
//! thread and the pass waits at most [`STATVFS_TIMEOUT`] per mount. A mount that does not
//! answer in time is skipped, with the reason in the status, until its statvfs finally
//! returns; the blocked worker is abandoned and a fresh one serves the other mounts.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    io,
    mem::MaybeUninit,
    sync::{Arc, Mutex, PoisonError, mpsc},
    thread,
    time::Duration,
};

use super::{SourceError, labels, push};
use crate::sample::Sample;

pub const FILESYSTEM_SIZE_METRIC: &str = "vigil_host_filesystem_size_bytes";
/// Free bytes, including those reserved for root.
pub const FILESYSTEM_FREE_METRIC: &str = "vigil_host_filesystem_free_bytes";
/// Free bytes an unprivileged process can use (free less the root reserve).
pub const FILESYSTEM_AVAIL_METRIC: &str = "vigil_host_filesystem_avail_bytes";

const MOUNTS_PATH: &str = "/proc/self/mounts";
/// How long one statvfs may take before its mount is given up on.
pub(super) const STATVFS_TIMEOUT: Duration = Duration::from_secs(1);

/// Which mounts are reported (`host.exclude_filesystem_types`, `host.exclude_mount_points`).
pub(super) struct FilesystemFilter {
    excluded_types: BTreeSet<String>,
    excluded_mount_points: Vec<String>,
}

impl FilesystemFilter {
    pub(super) fn new(excluded_types: &[String], excluded_mount_points: &[String]) -> Self {
        Self {
            excluded_types: excluded_types.iter().cloned().collect(),
            excluded_mount_points: excluded_mount_points
                .iter()
                .map(|m| m.trim_end_matches('/').to_string())
                .collect(),
        }
    }

    /// Whether a mount is reported: its type is not excluded, and it is neither an excluded
    /// mount point nor below one (`/run/containerd` covers `/run/containerd/x/shm`, not
    /// `/run/containerd2`).
    fn includes(&self, mount: &Mount) -> bool {
        if self.excluded_types.contains(&mount.fs_type) {
            return false;
        }
        !self.excluded_mount_points.iter().any(|excluded| {
            mount
                .mount_point
                .strip_prefix(excluded.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }
}

/// One line of /proc/self/mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    device: String,
    mount_point: String,
    fs_type: String,
}

/// The mount table, one entry per mount point: when a mount point is mounted over, the last
/// (visible) mount wins, since that is the one statvfs sees. Sorted by mount point.
fn parse_mounts(text: &str) -> Vec<Mount> {
    let mut by_mount_point = BTreeMap::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(device), Some(mount_point), Some(fs_type)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let mount_point = unescape(mount_point);
        by_mount_point.insert(
            mount_point.clone(),
            Mount {
                device: unescape(device),
                mount_point,
                fs_type: fs_type.to_string(),
            },
        );
    }
    by_mount_point.into_values().collect()
}

/// The kernel writes space, tab, newline and backslash in mount fields as octal escapes
/// (`\040`); anything else is kept as written.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let octal = bytes.get(index + 1..index + 4).filter(|digits| {
            bytes[index] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        });
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |value, d| value * 8 + u32::from(d - b'0'));
                out.push(value as u8);
                index += 4;
            }
            None => {
                out.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What statvfs says about a filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Space {
    size: u64,
    free: u64,
    avail: u64,
}

// The fields are u64 on 64-bit targets but `unsigned long` on 32-bit ones.
#[allow(clippy::unnecessary_cast)]
fn statvfs(mount_point: &str) -> io::Result<Space> {
    let path =
        CString::new(mount_point).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut stat = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and outlives the call; `stat` is a valid place for the
    // kernel to write one `struct statvfs`.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    let fragment = stat.f_frsize as u64;
    Ok(Space {
        size: stat.f_blocks as u64 * fragment,
        free: stat.f_bfree as u64 * fragment,
        avail: stat.f_bavail as u64 * fragment,
    })
}

/// Mount points whose statvfs timed out and has not returned since.
type StuckMounts = Arc<Mutex<BTreeSet<String>>>;

/// A thread that runs statvfs for a batch of mount points, answering one by one in order.
struct StatvfsWorker {
    requests: mpsc::Sender<Vec<String>>,
    replies: mpsc::Receiver<io::Result<Space>>,
}

impl StatvfsWorker {
    fn spawn(stuck: StuckMounts, statvfs: fn(&str) -> io::Result<Space>) -> io::Result<Self> {
        let (requests, request_rx) = mpsc::channel::<Vec<String>>();
        let (reply_tx, replies) = mpsc::channel();
        thread::Builder::new()
            .name("vigil-statvfs".into())
            .spawn(move || {
                for batch in request_rx {
                    for mount_point in batch {
                        let result = statvfs(&mount_point);
                        // Answer before un-sticking, so a collector that has just given up on
                        // this mount either sees the answer or sees it leave the stuck set.
                        let delivered = reply_tx.send(result).is_ok();
                        stuck
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&mount_point);
                        if !delivered {
                            return;
                        }
                    }
                }
            })?;
        Ok(Self { requests, replies })
    }
}

/// Reads filesystem space, keeping statvfs off the pass's own thread.
pub(super) struct FilesystemSpace {
    filter: FilesystemFilter,
    worker: Option<StatvfsWorker>,
    stuck: StuckMounts,
    /// [`statvfs`] and [`STATVFS_TIMEOUT`], except in tests of hung mounts.
    statvfs: fn(&str) -> io::Result<Space>,
    timeout: Duration,
}

impl FilesystemSpace {
    pub(super) fn new(filter: FilesystemFilter) -> Self {
        Self {
            filter,
            worker: None,
            stuck: Arc::default(),
            statvfs,
            timeout: STATVFS_TIMEOUT,
        }
    }

    /// Samples for every reported mount; the result says, per mount point (or for the mount
    /// table as a whole), what could not be read.
    pub(super) fn collect(&mut self, out: &mut Vec<Sample>) -> Vec<(String, SourceError)> {
        match std::fs::read_to_string(MOUNTS_PATH) {
            Ok(text) => self.collect_mounts(&text, out),
            Err(source) => {
                let error = SourceError::Read {
                    path: MOUNTS_PATH,
                    source,
                };
                vec![(MOUNTS_PATH.to_string(), error)]
            }
        }
    }

    /// [`Self::collect`] for a mount table in /proc/self/mounts format.
    fn collect_mounts(&mut self, text: &str, out: &mut Vec<Sample>) -> Vec<(String, SourceError)> {
        let mut problems = Vec::new();
        let stuck = self
            .stuck
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut pending: Vec<Mount> = Vec::new();
        for mount in parse_mounts(text) {
            if !self.filter.includes(&mount) {
                continue;
            }
            if stuck.contains(&mount.mount_point) {
                problems.push((
                    mount.mount_point.clone(),
                    timed_out(&mount.mount_point, self.timeout),
                ));
            } else {
                pending.push(mount);
            }
        }

        // Each round sends what is left to a worker; a timeout abandons it and starts a new
        // round with the mounts after the stuck one.
        while !pending.is_empty() {
            let worker = match self.worker.take() {
                Some(worker) => worker,
                None => match StatvfsWorker::spawn(self.stuck.clone(), self.statvfs) {
                    Ok(worker) => worker,
                    Err(source) => {
                        for mount in pending.drain(..) {
                            let error = SourceError::Statvfs {
                                mount_point: mount.mount_point.clone(),
                                source: io::Error::new(
                                    source.kind(),
                                    format!("cannot start the statvfs thread: {source}"),
                                ),
                            };
                            problems.push((mount.mount_point, error));
                        }
                        break;
                    }
                },
            };
            let batch = pending
                .iter()
                .map(|mount| mount.mount_point.clone())
                .collect();
            if worker.requests.send(batch).is_err() {
                // The worker is gone (it only exits when abandoned); start another.
                continue;
            }
            let mut answered = 0;
            let mut abandoned = false;
            for mount in &pending {
                let reply = match worker.replies.recv_timeout(self.timeout) {
                    Ok(reply) => reply,
                    Err(_) => {
                        self.give_up_on(&worker, mount, out, &mut problems);
                        answered += 1;
                        abandoned = true;
                        break;
                    }
                };
                answered += 1;
                match reply {
                    Ok(space) => push_space(out, mount, space),
                    Err(source) => problems.push((
                        mount.mount_point.clone(),
                        SourceError::Statvfs {
                            mount_point: mount.mount_point.clone(),
                            source,
                        },
                    )),
                }
            }
            pending.drain(..answered);
            if !abandoned {
                self.worker = Some(worker);
            }
        }
        problems
    }

    /// Marks a mount whose statvfs did not answer in time as stuck; the worker stays blocked
    /// in the kernel and is dropped (it exits once statvfs returns).
    fn give_up_on(
        &self,
        worker: &StatvfsWorker,
        mount: &Mount,
        out: &mut Vec<Sample>,
        problems: &mut Vec<(String, SourceError)>,
    ) {
        self.stuck
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(mount.mount_point.clone());
        // It may have answered just now, before seeing the mount marked stuck.
        if let Ok(reply) = worker.replies.try_recv() {
            self.stuck
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&mount.mount_point);
            if let Ok(space) = reply {
                push_space(out, mount, space);
                return;
            }
        }
        problems.push((
            mount.mount_point.clone(),
            timed_out(&mount.mount_point, self.timeout),
        ));
    }
}

fn timed_out(mount_point: &str, timeout: Duration) -> SourceError {
    SourceError::Statvfs {
        mount_point: mount_point.to_string(),
        source: io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no answer within {timeout:?} (a hung network filesystem?); skipped until it \
                 answers"
            ),
        ),
    }
}

fn push_space(out: &mut Vec<Sample>, mount: &Mount, space: Space) {
    let labels = labels([
        ("device", mount.device.as_str()),
        ("mountpoint", mount.mount_point.as_str()),
        ("fstype", mount.fs_type.as_str()),
    ]);
    push(
        out,
        FILESYSTEM_SIZE_METRIC,
        labels.clone(),
        space.size as f64,
    );
    push(
        out,
        FILESYSTEM_FREE_METRIC,
        labels.clone(),
        space.free as f64,
    );
    push(out, FILESYSTEM_AVAIL_METRIC, labels, space.avail as f64);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::collectors::{error_chain, host::HostConfig};

    fn mount(mount_point: &str, fs_type: &str) -> Mount {
        Mount {
            device: "dev".into(),
            mount_point: mount_point.into(),
            fs_type: fs_type.into(),
        }
    }

    fn default_filter() -> FilesystemFilter {
        let config = HostConfig::default();
        FilesystemFilter::new(
            &config.exclude_filesystem_types,
            &config.exclude_mount_points,
        )
    }

    #[test]
    fn pseudo_and_layered_filesystems_are_excluded_by_type() {
        let filter = default_filter();
        for fs_type in [
            "proc", "sysfs", "cgroup2", "devpts", "overlay", "squashfs", "tracefs",
        ] {
            assert!(!filter.includes(&mount("/x", fs_type)), "{fs_type}");
        }
        for fs_type in ["ext4", "xfs", "nfs4", "tmpfs"] {
            assert!(filter.includes(&mount("/x", fs_type)), "{fs_type}");
        }
    }

    #[test]
    fn per_pod_mounts_are_excluded_with_everything_below_them() {
        let filter = default_filter();
        let pod_volume = "/var/lib/kubelet/pods/0d7c/volumes/kubernetes.io~projected/kube-api";
        assert!(!filter.includes(&mount(pod_volume, "tmpfs")));
        assert!(!filter.includes(&mount("/run/containerd/io.containerd/shm", "tmpfs")));
        assert!(!filter.includes(&mount("/var/lib/docker", "ext4")));
        // A sibling that only shares the prefix, and the node's own /dev/shm, are kept.
        assert!(filter.includes(&mount("/var/lib/dockerdata", "ext4")));
        assert!(filter.includes(&mount("/dev/shm", "tmpfs")));
        assert!(filter.includes(&mount("/", "ext4")));
    }

    #[test]
    fn excluded_mount_points_match_with_or_without_a_trailing_slash() {
        let filter = FilesystemFilter::new(&[], &["/data/".to_string()]);
        assert!(!filter.includes(&mount("/data", "ext4")));
        assert!(!filter.includes(&mount("/data/a", "ext4")));
        assert!(filter.includes(&mount("/database", "ext4")));
    }

    #[test]
    fn mount_table_is_unescaped_and_the_last_mount_on_a_point_wins() {
        let text = "/dev/vda1 / ext4 rw,relatime 0 0\n\
                    tmpfs /mnt/model\\040store tmpfs rw 0 0\n\
                    /dev/vdb /data ext4 rw 0 0\n\
                    server:/export /data nfs4 rw 0 0\n\
                    garbage\n";
        assert_eq!(
            parse_mounts(text),
            vec![
                Mount {
                    device: "/dev/vda1".into(),
                    mount_point: "/".into(),
                    fs_type: "ext4".into(),
                },
                Mount {
                    device: "server:/export".into(),
                    mount_point: "/data".into(),
                    fs_type: "nfs4".into(),
                },
                Mount {
                    device: "tmpfs".into(),
                    mount_point: "/mnt/model store".into(),
                    fs_type: "tmpfs".into(),
                },
            ]
        );
    }

    #[test]
    fn only_three_digit_octal_escapes_are_decoded() {
        assert_eq!(unescape(r"a\040b\011c\134d"), "a b\tc\\d");
        assert_eq!(unescape(r"a\09b\4"), r"a\09b\4");
    }

    /// Released by the test of hung mounts; until then statvfs of `/hung` blocks.
    static HUNG_MOUNT_RELEASED: AtomicBool = AtomicBool::new(false);

    fn statvfs_with_a_hung_mount(mount_point: &str) -> io::Result<Space> {
        if mount_point == "/hung" {
            while !HUNG_MOUNT_RELEASED.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(Space {
            size: 3000,
            free: 2000,
            avail: 1000,
        })
    }

    fn reported_mounts(out: &[Sample]) -> Vec<&str> {
        out.iter()
            .filter(|s| s.name == FILESYSTEM_SIZE_METRIC)
            .map(|s| s.labels["mountpoint"].as_str())
            .collect()
    }

    #[test]
    fn a_hung_mount_is_skipped_until_its_statvfs_returns_and_the_others_are_read() {
        let mut space = FilesystemSpace::new(FilesystemFilter::new(&[], &[]));
        space.statvfs = statvfs_with_a_hung_mount;
        space.timeout = Duration::from_millis(100);
        let table = "a /a ext4 rw 0 0\nh /hung nfs4 rw 0 0\nb /b ext4 rw 0 0\n";

        for pass in 0..2 {
            let mut out = Vec::new();
            let problems = space.collect_mounts(table, &mut out);
            assert_eq!(reported_mounts(&out), ["/a", "/b"], "pass {pass}");
            let problems: Vec<(&str, String)> = problems
                .iter()
                .map(|(mount_point, error)| (mount_point.as_str(), error_chain(error)))
                .collect();
            assert_eq!(
                problems,
                [(
                    "/hung",
                    "statvfs(/hung) failed: no answer within 100ms (a hung network \
                     filesystem?); skipped until it answers"
                        .to_string()
                )],
                "pass {pass}"
            );
        }

        HUNG_MOUNT_RELEASED.store(true, Ordering::SeqCst);
        let unstuck = (0..200).any(|_| {
            thread::sleep(Duration::from_millis(5));
            space.stuck.lock().unwrap().is_empty()
        });
        assert!(unstuck, "the abandoned worker never reported back");
        let mut out = Vec::new();
        assert!(space.collect_mounts(table, &mut out).is_empty());
        assert_eq!(reported_mounts(&out), ["/a", "/b", "/hung"]);
        let avail = out
            .iter()
            .find(|s| s.name == FILESYSTEM_AVAIL_METRIC && s.labels["mountpoint"] == "/hung")
            .map(|s| s.value.clone());
        assert_eq!(avail, Some(crate::sample::SampleValue::Value(1000.0)));
    }

    #[test]
    fn statvfs_of_a_missing_path_fails_with_its_errno() {
        let error = statvfs("/nonexistent/vigil-host-test").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        let root = statvfs("/").unwrap();
        assert!(
            root.size >= root.free && root.free >= root.avail,
            "{root:?}"
        );
    }
}
