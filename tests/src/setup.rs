//! The start of a privileged test: a fresh island and work directory, and a mesh on
//! them.

use std::ops::Deref;
use std::path::{Path, PathBuf};

use crate::mesh::Mesh;
use crate::{require_privileges, DirectoryExtras, Island, IslandSpec, Pod};

/// A running island with a mesh on it. Fields drop in order: the mesh's processes stop
/// before the island's namespaces go.
pub struct TestMesh {
    pub mesh: Mesh,
    pub island: Island,
    pub work_dir: WorkDir,
}

/// Environment variable that, set to any value, keeps the work directories of passed
/// tests too.
pub const KEEP_WORK_DIRS_VAR: &str = "INTERCEPTOR_KEEP_WORK_DIRS";

/// A test's work directory (CA keys, join tokens, logs, captures). It is removed when
/// the test passes, unless [`KEEP_WORK_DIRS_VAR`] is set, and kept when the test fails,
/// for debugging.
#[derive(Debug)]
pub struct WorkDir(PathBuf);

impl WorkDir {
    /// Empties or creates the directory at `path`.
    ///
    /// # Panics
    ///
    /// When the directory cannot be created.
    pub fn create(path: PathBuf) -> WorkDir {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating the work directory");
        WorkDir(path)
    }
}

impl Deref for WorkDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for WorkDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "kept the work directory of the failed test: {}",
                self.0.display()
            );
            return;
        }
        if std::env::var_os(KEEP_WORK_DIRS_VAR).is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Which pods of the island are enrolled in the mesh.
#[derive(Clone, Copy)]
pub enum Enroll<'a> {
    /// Every pod.
    All,
    /// The pods for which the function returns true.
    Matching(fn(&Pod) -> bool),
    /// The pods (node, pod), in this order.
    Pods(&'a [(usize, usize)]),
}

/// Builds the directory extras of an island from the island and its work directory.
pub type ExtrasFn<'a> = dyn Fn(&Island, &Path) -> DirectoryExtras + 'a;

/// Options of [`start_test_mesh`]. The default is 2 nodes with 2 pods each, all
/// enrolled, in the work directory `interceptor-e2e-PREFIX`, with no extras and no
/// daemon arguments.
pub struct MeshOptions<'a> {
    pub nodes: usize,
    pub pods_per_node: usize,
    /// The middle part of the work directory's name, see [`work_dir`].
    pub work_dir_kind: &'a str,
    pub enroll: Enroll<'a>,
    /// Builds the directory extras once the island is up and the work directory
    /// exists, for instance from the pods' addresses.
    pub extras: Option<&'a ExtrasFn<'a>>,
    /// Arguments added to every `interceptor run`.
    pub daemon_args: &'a [&'a str],
    /// Arguments added to `interceptor ca serve`.
    pub ca_args: &'a [&'a str],
}

impl Default for MeshOptions<'_> {
    fn default() -> Self {
        MeshOptions {
            nodes: 2,
            pods_per_node: 2,
            work_dir_kind: "e2e",
            enroll: Enroll::All,
            extras: None,
            daemon_args: &[],
            ca_args: &[],
        }
    }
}

/// Returns the work directory of the test island `prefix`:
/// `$TMPDIR/interceptor-KIND-PREFIX`.
pub fn work_dir(kind: &str, prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("interceptor-{kind}-{prefix}"))
}

/// Checks the privileges of `test`, builds the island `prefix` on subnet `subnet` and
/// empties its work directory (see [`work_dir`]). Returns `None` when the test cannot
/// run here (outside CI only).
pub fn start_island(
    test: &str,
    prefix: &str,
    subnet: u8,
    nodes: usize,
    pods_per_node: usize,
    work_dir_kind: &str,
) -> Option<(Island, WorkDir)> {
    if !require_privileges(test) {
        return None;
    }
    let spec = IslandSpec {
        prefix: prefix.to_owned(),
        nodes,
        pods_per_node,
        subnet,
    };
    let island = Island::up(spec).expect("building the island");
    Some((island, WorkDir::create(work_dir(work_dir_kind, prefix))))
}

/// Builds the island as [`start_island`] does and starts the CA service and one daemon
/// per node on it, enrolling the pods that `options` names. Returns `None` when the
/// test cannot run here (outside CI only).
pub fn start_test_mesh(
    test: &str,
    prefix: &str,
    subnet: u8,
    options: MeshOptions<'_>,
) -> Option<TestMesh> {
    let (island, work_dir) = start_island(
        test,
        prefix,
        subnet,
        options.nodes,
        options.pods_per_node,
        options.work_dir_kind,
    )?;
    let enrolled: Vec<&Pod> = match options.enroll {
        Enroll::All => island.pods().iter().collect(),
        Enroll::Matching(enroll) => island.pods().iter().filter(|pod| enroll(pod)).collect(),
        Enroll::Pods(pods) => pods
            .iter()
            .map(|&(node, pod)| island.pod(node, pod))
            .collect(),
    };
    let extras = match options.extras {
        Some(extras) => extras(&island, &work_dir),
        None => DirectoryExtras::default(),
    };
    let mesh = Mesh::start_with_ca_args(
        &island,
        &work_dir,
        &enrolled,
        &extras,
        options.daemon_args,
        options.ca_args,
    )
    .expect("starting the mesh");
    Some(TestMesh {
        mesh,
        island,
        work_dir,
    })
}
