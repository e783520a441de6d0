//! Which container, and which Kubernetes pod, a process runs in, read from its cgroup path
//! (`/proc/PID/cgroup`).
//!
//! Container runtimes name a container's cgroup after its 64-hex container id, and the kubelet
//! names the pod's cgroup after the pod UID and its QoS class, so the path alone identifies both
//! without asking any daemon. The shapes differ by runtime and by cgroup driver:
//!
//! | who | driver | container cgroup |
//! |---|---|---|
//! | kubelet + containerd | systemd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` |
//! | kubelet + CRI-O | systemd | `.../kubepods-besteffort-pod<uid>.slice/crio-<id>.scope` |
//! | kubelet + cri-dockerd | systemd | `.../kubepods-pod<uid>.slice/docker-<id>.scope` (Guaranteed: no QoS slice) |
//! | kubelet + any runtime | cgroupfs | `/kubepods/burstable/pod<uid>/<id>`, `/kubepods/pod<uid>/<id>` (Guaranteed) |
//! | Docker | cgroupfs | `/docker/<id>` |
//! | Docker, nerdctl, Podman | systemd | `/system.slice/docker-<id>.scope`, `nerdctl-<id>.scope`, `/machine.slice/libpod-<id>.scope` |
//! | containerd (`ctr`, nerdctl) | cgroupfs | `/<containerd namespace>/<id>`, e.g. `/default/<id>` |
//!
//! Paths are matched segment by segment rather than by prefix, so the same rules work when the
//! kubelet runs with a `--cgroup-root` (kind: `/kubelet.slice/kubelet-kubepods.slice/...`) and
//! when the agent runs in a private cgroup namespace, where other pods' paths start with `/../..`.

use std::path::Path;

/// The container runtime that created a container's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContainerRuntime {
    Containerd,
    CriO,
    Docker,
    Podman,
    /// The path names a container but not who made it: the kubelet's cgroupfs driver names a
    /// container's cgroup by its bare id whatever the runtime (the pod's `containerID` in the
    /// Kubernetes API says which), and so do runtimes started with a custom cgroup parent.
    Unknown,
}

/// A pod's Kubernetes QoS class, which decides its cgroup parent (and its eviction order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// The class as the Kubernetes API spells it (`status.qosClass`).
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }

    /// Parses the API's `status.qosClass`.
    pub fn from_api(class: &str) -> Option<Self> {
        match class {
            "Guaranteed" => Some(QosClass::Guaranteed),
            "Burstable" => Some(QosClass::Burstable),
            "BestEffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }
}

/// The container a process runs in, as its cgroup path tells it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerIdentity {
    pub runtime: ContainerRuntime,
    /// The full container id: 64 lowercase hex digits, as `crictl ps` / `docker ps --no-trunc`
    /// and the pod's `containerID` (after `containerd://`) show it.
    pub container_id: String,
    /// The pod's UID as the Kubernetes API reports it (`metadata.uid`, with dashes; the systemd
    /// driver writes it with underscores). For a static pod this is the kubelet's config hash (32
    /// hex digits), which the API shows as the mirror pod's `kubernetes.io/config.mirror`
    /// annotation. `None` outside Kubernetes.
    pub pod_uid: Option<String>,
    /// The pod's QoS class when the path shows it; `None` outside Kubernetes or when the path
    /// is cut above the QoS level (private cgroup namespace).
    pub qos: Option<QosClass>,
}

impl ContainerIdentity {
    /// The first 12 hex digits of the id, as `docker ps` and `crictl ps` show it.
    pub fn short_id(&self) -> &str {
        &self.container_id[..12]
    }
}

/// Reads `/proc/PID/cgroup`; `None` when the process is in no container, has exited, or the
/// file is unreadable.
pub fn read_container_identity(pid: u32) -> Option<ContainerIdentity> {
    read_container_identity_in(Path::new("/proc"), pid)
}

/// [`read_container_identity`] with `proc_root` in place of `/proc` (tests, or a host `/proc`
/// mounted elsewhere in a container).
pub fn read_container_identity_in(proc_root: &Path, pid: u32) -> Option<ContainerIdentity> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    parse_proc_cgroup(&text)
}

/// The container named by the text of a `/proc/PID/cgroup` file, cgroup v1 (one
/// `hierarchy-id:controllers:path` line per hierarchy, some of which may show `/`) or v2 (one
/// `0::path` line). The first line whose path names a container wins.
pub fn parse_proc_cgroup(text: &str) -> Option<ContainerIdentity> {
    text.lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .find_map(parse_cgroup_path)
}

/// The container named by one cgroup path, e.g.
/// `/kubepods.slice/kubepods-pod<uid>.slice/cri-containerd-<id>.scope`.
pub fn parse_cgroup_path(path: &str) -> Option<ContainerIdentity> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // The innermost container wins: Podman and CRI-O may add a child cgroup under the
    // container's scope (`libpod-<id>.scope/container`), and Docker-in-Docker nests ids.
    let (index, runtime, container_id) =
        segments.iter().enumerate().rev().find_map(|(i, segment)| {
            container_segment(segment).map(|(runtime, id)| (i, runtime, id))
        })?;
    let parents = &segments[..index];
    let pod = parents
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, segment)| pod_segment(segment, i.checked_sub(1).map(|p| parents[p])));
    let runtime = match runtime {
        Some(runtime) => runtime,
        None => bare_id_runtime(parents, pod.is_some()),
    };
    Some(ContainerIdentity {
        runtime,
        container_id: container_id.to_string(),
        pod_uid: pod.as_ref().map(|(uid, _)| uid.clone()),
        qos: pod.and_then(|(_, qos)| qos),
    })
}

/// A container's own cgroup: the runtime when the name says it, and the id.
fn container_segment(segment: &str) -> Option<(Option<ContainerRuntime>, &str)> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    if is_hex(name, 64) {
        return Some((None, name));
    }
    const PREFIXES: [(&str, ContainerRuntime); 5] = [
        ("cri-containerd-", ContainerRuntime::Containerd),
        ("nerdctl-", ContainerRuntime::Containerd),
        ("crio-", ContainerRuntime::CriO),
        ("docker-", ContainerRuntime::Docker),
        ("libpod-", ContainerRuntime::Podman),
    ];
    // `crio-conmon-<id>` and `libpod-conmon-<id>` hold the runtime's monitor process, not the
    // container, so their ids (after "conmon-") are not 64 hex digits here and do not match.
    PREFIXES.iter().find_map(|(prefix, runtime)| {
        let id = name.strip_prefix(prefix)?;
        is_hex(id, 64).then_some((Some(*runtime), id))
    })
}

/// The runtime of a container whose cgroup is its bare id.
fn bare_id_runtime(parents: &[&str], in_pod: bool) -> ContainerRuntime {
    match parents.last() {
        Some(&"docker") => ContainerRuntime::Docker,
        // containerd's cgroupfs layout is `/<namespace>/<id>`; `default` is `ctr`'s and
        // nerdctl's namespace, `k8s.io` the CRI plugin's.
        Some(&"default") | Some(&"k8s.io") if !in_pod && parents.len() == 1 => {
            ContainerRuntime::Containerd
        }
        _ => ContainerRuntime::Unknown,
    }
}

/// A pod's cgroup: its UID (with dashes) and, when the path shows it, the QoS class.
///
/// systemd driver: `kubepods-burstable-pod<uid_>.slice`, `kubepods-besteffort-pod<uid_>.slice`,
/// `kubepods-pod<uid_>.slice` (Guaranteed), possibly under a cgroup-root prefix
/// (`kubelet-kubepods-...`). cgroupfs driver: `pod<uid>` under `burstable`, `besteffort` or
/// directly under `kubepods` (Guaranteed).
fn pod_segment(segment: &str, parent: Option<&str>) -> Option<(String, Option<QosClass>)> {
    if let Some(slice) = segment.strip_suffix(".slice") {
        let (unit, uid) = slice.rsplit_once("-pod")?;
        let uid = pod_uid(uid)?;
        let qos = if unit.ends_with("-burstable") {
            QosClass::Burstable
        } else if unit.ends_with("-besteffort") {
            QosClass::BestEffort
        } else if unit.ends_with("kubepods") {
            QosClass::Guaranteed
        } else {
            return None;
        };
        return Some((uid, Some(qos)));
    }
    let uid = pod_uid(segment.strip_prefix("pod")?)?;
    let qos = match parent {
        Some("burstable") => Some(QosClass::Burstable),
        Some("besteffort") => Some(QosClass::BestEffort),
        Some("kubepods") => Some(QosClass::Guaranteed),
        _ => None,
    };
    Some((uid, qos))
}

/// A pod UID as the API spells it: a dashed UUID (the systemd driver's underscores turned back
/// into dashes), or a static pod's 32-hex config hash as is.
fn pod_uid(text: &str) -> Option<String> {
    if is_hex(text, 32) {
        return Some(text.to_string());
    }
    let bytes = text.as_bytes();
    let well_formed = bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-' || *b == b'_',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(b),
        });
    well_formed.then(|| text.replace('_', "-"))
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f0c2a5be8d1937f6a2c0b8e9d7f1a3c5e6b2d4f8a0c1e3b5d7f9a2c4e6b8d0f";
    const UID: &str = "8d6d3a5e-9c1b-4a8e-b3a4-2f7c1e0d9b61";

    fn identity(
        runtime: ContainerRuntime,
        pod: Option<&str>,
        qos: Option<QosClass>,
    ) -> ContainerIdentity {
        ContainerIdentity {
            runtime,
            container_id: ID.to_string(),
            pod_uid: pod.map(str::to_string),
            qos,
        }
    }

    fn parse(fixture: &str) -> Option<ContainerIdentity> {
        parse_proc_cgroup(&fixture.replace("<ID>", ID))
    }

    /// kubelet + containerd, systemd cgroup driver, cgroup v2 (Ubuntu 22.04+, EKS AL2023, GKE COS).
    const CONTAINERD_SYSTEMD_V2: &str = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8d6d3a5e_9c1b_4a8e_b3a4_2f7c1e0d9b61.slice/cri-containerd-<ID>.scope\n";

    /// kubelet + CRI-O, systemd driver, cgroup v2 (OpenShift 4.14+), a BestEffort pod.
    const CRIO_SYSTEMD_V2: &str = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod8d6d3a5e_9c1b_4a8e_b3a4_2f7c1e0d9b61.slice/crio-<ID>.scope\n";

    /// kubelet + cri-dockerd, systemd driver, cgroup v2, a Guaranteed pod (no QoS slice).
    const DOCKER_SYSTEMD_GUARANTEED_V2: &str = "0::/kubepods.slice/kubepods-pod8d6d3a5e_9c1b_4a8e_b3a4_2f7c1e0d9b61.slice/docker-<ID>.scope\n";

    /// kubelet + containerd, systemd driver, cgroup v1 (Ubuntu 20.04, CentOS 7): every
    /// hierarchy shows the container, except rdma and the unified `0::/` line.
    const CONTAINERD_SYSTEMD_V1: &str = "\
12:rdma:/
11:pids:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8d6d3a5e_9c1b_4a8e_b3a4_2f7c1e0d9b61.slice/cri-containerd-<ID>.scope
10:cpu,cpuacct:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8d6d3a5e_9c1b_4a8e_b3a4_2f7c1e0d9b61.slice/cri-containerd-<ID>.scope
9:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8d6d3a5e_9c1b_4a8e_b3a4_2f7c1e0d9b61.slice/cri-containerd-<ID>.scope
1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8d6d3a5e_9c1b_4a8e_b3a4_2f7c1e0d9b61.slice/cri-containerd-<ID>.scope
0::/
";

    /// kubelet, cgroupfs driver, cgroup v1, a Burstable pod: the container cgroup is the bare id
    /// whatever the runtime.
    const CGROUPFS_BURSTABLE_V1: &str = "\
11:devices:/kubepods/burstable/pod8d6d3a5e-9c1b-4a8e-b3a4-2f7c1e0d9b61/<ID>
10:misc:/
4:memory:/kubepods/burstable/pod8d6d3a5e-9c1b-4a8e-b3a4-2f7c1e0d9b61/<ID>
1:name=systemd:/kubepods/burstable/pod8d6d3a5e-9c1b-4a8e-b3a4-2f7c1e0d9b61/<ID>
";

    /// kubelet, cgroupfs driver, cgroup v2, a Guaranteed pod (directly under `kubepods`).
    const CGROUPFS_GUARANTEED_V2: &str =
        "0::/kubepods/pod8d6d3a5e-9c1b-4a8e-b3a4-2f7c1e0d9b61/<ID>\n";

    /// kubelet, cgroupfs driver, cgroup v2, a BestEffort pod.
    const CGROUPFS_BESTEFFORT_V2: &str =
        "0::/kubepods/besteffort/pod8d6d3a5e-9c1b-4a8e-b3a4-2f7c1e0d9b61/<ID>\n";

    /// kind (kubelet `--cgroup-root=/kubelet`), containerd, systemd driver, cgroup v2.
    const KIND_CGROUP_ROOT_V2: &str = "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod8d6d3a5e_9c1b_4a8e_b3a4_2f7c1e0d9b61.slice/cri-containerd-<ID>.scope\n";

    /// The agent itself in a pod with a private cgroup namespace (containerd's default on
    /// cgroup v2) reading another pod's process: the path is relative to the agent's own cgroup.
    const PRIVATE_CGROUP_NAMESPACE_V2: &str = "0::/../../../kubepods-besteffort.slice/kubepods-besteffort-pod8d6d3a5e_9c1b_4a8e_b3a4_2f7c1e0d9b61.slice/cri-containerd-<ID>.scope\n";

    /// A static pod (kube-apiserver, or a model server from /etc/kubernetes/manifests): its
    /// cgroup carries the kubelet's 32-hex config hash instead of a UUID.
    const STATIC_POD_SYSTEMD_V2: &str = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f3c0e3b2a1d4c5e8f9a0b1c2d3e4f5a.slice/cri-containerd-<ID>.scope\n";

    /// Plain Docker, cgroupfs driver, cgroup v1 (Docker's default before cgroup v2 distros).
    const DOCKER_CGROUPFS_V1: &str = "\
13:rdma:/
12:pids:/docker/<ID>
5:memory:/docker/<ID>
1:name=systemd:/docker/<ID>
0::/system.slice/containerd.service
";

    /// Plain Docker, systemd driver, cgroup v2 (Debian 11+, Ubuntu 22.04+).
    const DOCKER_SYSTEMD_V2: &str = "0::/system.slice/docker-<ID>.scope\n";

    /// Rootful Podman, systemd driver, cgroup v2 (Fedora, RHEL 9).
    const PODMAN_ROOTFUL_V2: &str = "0::/machine.slice/libpod-<ID>.scope/container\n";

    /// Rootless Podman, cgroup v2: the container sits under the user's systemd instance.
    const PODMAN_ROOTLESS_V2: &str =
        "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-<ID>.scope\n";

    /// containerd without Kubernetes (`ctr run`, nerdctl with cgroupfs), cgroup v2: the cgroup
    /// is `/<containerd namespace>/<id>`.
    const CONTAINERD_DEFAULT_NAMESPACE_V2: &str = "0::/default/<ID>\n";

    /// nerdctl, systemd driver, cgroup v2.
    const NERDCTL_SYSTEMD_V2: &str = "0::/system.slice/nerdctl-<ID>.scope\n";

    /// CRI-O's monitor process (conmon) beside a container, systemd driver: not the container.
    const CRIO_CONMON_V2: &str = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8d6d3a5e_9c1b_4a8e_b3a4_2f7c1e0d9b61.slice/crio-conmon-<ID>.scope\n";

    /// Processes in no container, systemd hosts.
    const LOGIN_SESSION_V2: &str = "0::/user.slice/user-1000.slice/session-3.scope\n";
    const SYSTEM_SERVICE_V2: &str = "0::/system.slice/sshd.service\n";
    const INIT_V2: &str = "0::/init.scope\n";
    const CONTAINERD_DAEMON_V1: &str = "\
12:pids:/system.slice/containerd.service
1:name=systemd:/system.slice/containerd.service
0::/
";
    /// A process in the agent's own cgroup namespace root (or on a host without cgroups set up).
    const ROOT_V2: &str = "0::/\n";

    #[test]
    fn kubelet_systemd_driver_paths_give_container_id_pod_uid_with_dashes_and_qos() {
        use ContainerRuntime::*;
        use QosClass::*;
        assert_eq!(
            parse(CONTAINERD_SYSTEMD_V2),
            Some(identity(Containerd, Some(UID), Some(Burstable)))
        );
        assert_eq!(
            parse(CRIO_SYSTEMD_V2),
            Some(identity(CriO, Some(UID), Some(BestEffort)))
        );
        assert_eq!(
            parse(DOCKER_SYSTEMD_GUARANTEED_V2),
            Some(identity(Docker, Some(UID), Some(Guaranteed)))
        );
        assert_eq!(
            parse(CONTAINERD_SYSTEMD_V1),
            Some(identity(Containerd, Some(UID), Some(Burstable)))
        );
    }

    #[test]
    fn kubelet_cgroupfs_driver_paths_give_the_pod_but_not_the_runtime() {
        use ContainerRuntime::*;
        use QosClass::*;
        assert_eq!(
            parse(CGROUPFS_BURSTABLE_V1),
            Some(identity(Unknown, Some(UID), Some(Burstable)))
        );
        assert_eq!(
            parse(CGROUPFS_GUARANTEED_V2),
            Some(identity(Unknown, Some(UID), Some(Guaranteed)))
        );
        assert_eq!(
            parse(CGROUPFS_BESTEFFORT_V2),
            Some(identity(Unknown, Some(UID), Some(BestEffort)))
        );
    }

    #[test]
    fn a_kubelet_cgroup_root_prefix_and_a_private_cgroup_namespace_do_not_hide_the_pod() {
        use ContainerRuntime::*;
        use QosClass::*;
        assert_eq!(
            parse(KIND_CGROUP_ROOT_V2),
            Some(identity(Containerd, Some(UID), Some(Burstable)))
        );
        assert_eq!(
            parse(PRIVATE_CGROUP_NAMESPACE_V2),
            Some(identity(Containerd, Some(UID), Some(BestEffort)))
        );
    }

    #[test]
    fn a_static_pod_is_identified_by_its_config_hash() {
        assert_eq!(
            parse(STATIC_POD_SYSTEMD_V2),
            Some(identity(
                ContainerRuntime::Containerd,
                Some("6f3c0e3b2a1d4c5e8f9a0b1c2d3e4f5a"),
                Some(QosClass::Burstable)
            ))
        );
    }

    #[test]
    fn containers_outside_kubernetes_have_no_pod() {
        use ContainerRuntime::*;
        assert_eq!(
            parse(DOCKER_CGROUPFS_V1),
            Some(identity(Docker, None, None))
        );
        assert_eq!(parse(DOCKER_SYSTEMD_V2), Some(identity(Docker, None, None)));
        assert_eq!(parse(PODMAN_ROOTFUL_V2), Some(identity(Podman, None, None)));
        assert_eq!(
            parse(PODMAN_ROOTLESS_V2),
            Some(identity(Podman, None, None))
        );
        assert_eq!(
            parse(CONTAINERD_DEFAULT_NAMESPACE_V2),
            Some(identity(Containerd, None, None))
        );
        assert_eq!(
            parse(NERDCTL_SYSTEMD_V2),
            Some(identity(Containerd, None, None))
        );
    }

    #[test]
    fn processes_outside_containers_have_no_identity() {
        for fixture in [
            LOGIN_SESSION_V2,
            SYSTEM_SERVICE_V2,
            INIT_V2,
            CONTAINERD_DAEMON_V1,
            ROOT_V2,
            CRIO_CONMON_V2,
            "",
        ] {
            assert_eq!(parse(fixture), None, "{fixture}");
        }
    }

    #[test]
    fn ids_that_are_not_64_lowercase_hex_digits_are_not_containers() {
        assert_eq!(parse_proc_cgroup("0::/docker/4f0c2a5be8d1\n"), None);
        assert_eq!(
            parse_proc_cgroup(&format!("0::/docker/{}\n", ID.to_uppercase())),
            None
        );
        assert_eq!(
            parse_proc_cgroup(&format!("0::/system.slice/docker-{ID}.service\n")),
            None,
            "a unit other than a scope is not a container"
        );
    }

    #[test]
    fn the_short_id_is_the_first_12_hex_digits() {
        let identity = parse(DOCKER_SYSTEMD_V2).unwrap();
        assert_eq!(identity.short_id(), "4f0c2a5be8d1");
    }

    #[test]
    fn the_identity_is_read_from_proc_pid_cgroup_under_a_given_proc_root() {
        let proc_root = tempfile::tempdir().unwrap();
        std::fs::create_dir(proc_root.path().join("4242")).unwrap();
        std::fs::write(
            proc_root.path().join("4242/cgroup"),
            CONTAINERD_SYSTEMD_V2.replace("<ID>", ID),
        )
        .unwrap();
        assert_eq!(
            read_container_identity_in(proc_root.path(), 4242),
            Some(identity(
                ContainerRuntime::Containerd,
                Some(UID),
                Some(QosClass::Burstable)
            ))
        );
        assert_eq!(
            read_container_identity_in(proc_root.path(), 4243),
            None,
            "no such process"
        );
    }

    #[test]
    fn a_process_that_does_not_exist_has_no_identity() {
        assert_eq!(read_container_identity(u32::MAX), None);
    }
}
