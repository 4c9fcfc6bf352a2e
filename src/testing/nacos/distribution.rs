//! The server's classpath, resolved once by Maven: [`ServerLine`] (the lines we test against)
//! and [`Distribution`] (a resolved server ready to run), with the cache that keeps Maven from
//! running twice and the launcher that 3.x servers start through.
//!
//! Must not: fall back to anything when Maven or `javac` is missing or fails.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use super::error::{HarnessError, io_error};
use super::supervisor::wait_timeout;
use super::util::{LOG_TAIL_LINES, fnv1a, tail_lines};
use crate::runtime::lock;

/// The longest Maven may take to resolve the server (a cold `~/.m2` needs about a minute).
const MAVEN_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// The 2.x server's main class (module `nacos-console`).
const MAIN_CLASS: &str = "com.alibaba.nacos.Nacos";
/// A server directory (the pom's) holding this file is started through it: 3.x, whose
/// republished modules lack upstream's bootstrap (see `testing/nacos-3.1/`).
const LAUNCHER_SOURCE: &str = "NacosLauncher.java";
/// The launcher's class, in the default package.
const LAUNCHER_CLASS: &str = "NacosLauncher";
/// The properties file a 3.x server needs on its classpath, beside the launcher's source.
const LAUNCHER_PROPERTIES: &str = "application.properties";

/// The server lines the project tests against, each pinned by a pom in `testing/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerLine {
    /// Nacos 2.3.2 (`testing/nacos-2.3`).
    V2_3,
    /// Nacos 3.1.0 (`testing/nacos-3.1`), started through our launcher.
    V3_1,
}

impl ServerLine {
    /// Both lines, oldest first.
    pub const ALL: [ServerLine; 2] = [ServerLine::V2_3, ServerLine::V3_1];

    /// `2.3` or `3.1`, as [`Self::parse`] takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::V2_3 => "2.3",
            Self::V3_1 => "3.1",
        }
    }

    /// The line named `2.3` or `3.1`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|line| line.name() == name.trim())
    }

    /// The version its pom pins, as [`Distribution::server_version`] reports it.
    pub fn pinned_version(self) -> &'static str {
        match self {
            Self::V2_3 => "2.3.2",
            Self::V3_1 => "3.1.0-bugfix",
        }
    }

    /// Resolves this line's server for the crate at `root` (the pom under `root/testing/`,
    /// the cache in `root/target/nacos-server`).
    pub fn resolve(self, root: &Path) -> Result<Distribution, HarnessError> {
        let pom = root
            .join("testing")
            .join(format!("nacos-{}", self.name()))
            .join("pom.xml");
        Distribution::resolve(&root.join("target/nacos-server"), &pom)
    }
}

/// Distributions resolved by this process, keyed by classpath file: later calls skip even the
/// file checks, and the mutex keeps threads of one process from running Maven together.
static RESOLVED: Mutex<Vec<(PathBuf, Distribution)>> = Mutex::new(Vec::new());

/// A Nacos server ready to run: the classpath of `com.alibaba.nacos:nacos-console` and its
/// dependencies, as jars in the local Maven repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distribution {
    pub(super) classpath: String,
    classpath_file: PathBuf,
    server_version: String,
    /// The class `java` runs: Nacos' own on 2.x, our launcher on 3.x.
    pub(super) main_class: String,
}

impl Distribution {
    /// Resolves the server that `pom` names, running Maven only if needed.
    ///
    /// Runs `mvn dependency:build-classpath` once and keeps the result in `cache_dir` (a file
    /// named after a hash of the pom, so a changed pom resolves again); later calls reuse it as
    /// long as every jar on it still exists. The jars themselves stay in `~/.m2`. Safe to call
    /// from parallel tests: threads wait on a mutex, processes on a lock file in `cache_dir`,
    /// and the classpath file appears by atomic rename.
    ///
    /// Maven's output goes to `cache_dir/maven.log`; its last lines are in the error if it
    /// fails. There is no fallback: without Maven, or if it fails, this fails.
    pub fn resolve(cache_dir: &Path, pom: &Path) -> Result<Self, HarnessError> {
        let pom_bytes = fs::read(pom).map_err(io_error("reading the Maven pom", pom))?;
        fs::create_dir_all(cache_dir)
            .map_err(io_error("creating the cache directory", cache_dir))?;
        let cache_dir = fs::canonicalize(cache_dir)
            .map_err(io_error("resolving the cache directory", cache_dir))?;
        let pom = fs::canonicalize(pom).map_err(io_error("resolving the Maven pom", pom))?;
        let classpath_file = cache_dir.join(format!("classpath-{:016x}.txt", fnv1a(&pom_bytes)));

        let mut resolved = lock(&RESOLVED);
        if let Some((_, dist)) = resolved.iter().find(|(file, _)| *file == classpath_file) {
            return Ok(dist.clone());
        }
        let dist = match Self::load_cached(&classpath_file) {
            Some(dist) => dist,
            None => {
                let lock_path = cache_dir.join("resolve.lock");
                let lock = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)
                    .map_err(io_error("opening the lock file", &lock_path))?;
                rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
                    .map_err(|errno| io_error("locking", &lock_path)(io::Error::from(errno)))?;
                // Another process may have resolved it while we waited for the lock.
                match Self::load_cached(&classpath_file) {
                    Some(dist) => dist,
                    None => run_maven(&pom, &cache_dir, &classpath_file)?,
                }
                // `lock` closes here, which releases it.
            }
        };
        let dist = match pom.parent().map(|dir| dir.join(LAUNCHER_SOURCE)) {
            Some(source) if source.is_file() => dist.with_launcher(&source, &cache_dir)?,
            _ => dist,
        };
        resolved.push((classpath_file, dist.clone()));
        Ok(dist)
    }

    /// The major version, e.g. 2 for `2.3.2` and 3 for `3.1.0-bugfix`.
    pub fn major(&self) -> u32 {
        self.server_version
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .unwrap_or(0)
    }

    /// Puts our launcher in front of the classpath: compiled with `javac` against the
    /// resolved jars into `cache_dir` once (a directory named after a hash of its inputs, so a
    /// changed source, properties file or classpath compiles again), together with the
    /// `application.properties` found beside the source.
    fn with_launcher(mut self, source: &Path, cache_dir: &Path) -> Result<Self, HarnessError> {
        let properties = source.with_file_name(LAUNCHER_PROPERTIES);
        let source_text = fs::read(source).map_err(io_error("reading", source))?;
        let properties_text = fs::read(&properties).map_err(io_error("reading", &properties))?;
        let mut inputs = source_text;
        inputs.extend_from_slice(&properties_text);
        inputs.extend_from_slice(self.classpath.as_bytes());
        let out = cache_dir.join(format!("launcher-{:016x}", fnv1a(&inputs)));
        if !out.join("NacosLauncher.class").is_file() {
            compile_launcher(source, &properties, &self.classpath, cache_dir, &out)?;
        }
        let out = out.to_str().ok_or_else(|| HarnessError::InvalidOptions {
            reason: format!("the cache directory {} is not UTF-8", out.display()),
        })?;
        self.classpath = format!("{out}:{}", self.classpath);
        self.main_class = LAUNCHER_CLASS.to_owned();
        Ok(self)
    }

    /// The classpath, entries separated by `:`.
    pub fn classpath(&self) -> &str {
        &self.classpath
    }

    /// The file in the cache directory that holds the classpath.
    pub fn classpath_file(&self) -> &Path {
        &self.classpath_file
    }

    /// The server's version, from the name of the `nacos-console` jar, e.g. `2.3.2`.
    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    /// The cached classpath, unless it is missing or stale (a jar on it is gone).
    fn load_cached(classpath_file: &Path) -> Option<Self> {
        let text = fs::read_to_string(classpath_file).ok()?;
        Self::parse(&text, classpath_file).ok()
    }

    fn parse(text: &str, classpath_file: &Path) -> Result<Self, String> {
        let jars: Vec<&str> = text
            .trim()
            .split(':')
            .filter(|entry| !entry.is_empty())
            .collect();
        if jars.is_empty() {
            return Err("it is empty".to_owned());
        }
        if let Some(missing) = jars.iter().find(|jar| !Path::new(jar).is_file()) {
            return Err(format!("{missing} does not exist"));
        }
        let server_version = jars
            .iter()
            .filter_map(|jar| Path::new(jar).file_name()?.to_str())
            .find_map(|name| name.strip_prefix("nacos-console-")?.strip_suffix(".jar"))
            .ok_or_else(|| "it has no nacos-console jar".to_owned())?
            .to_owned();
        Ok(Self {
            classpath: jars.join(":"),
            classpath_file: classpath_file.to_path_buf(),
            server_version,
            main_class: MAIN_CLASS.to_owned(),
        })
    }
}

/// Compiles the launcher into a temporary directory beside `out` and renames it into place,
/// so a parallel test never sees half a directory. Javac's output goes to
/// `cache_dir/javac.log`.
fn compile_launcher(
    source: &Path,
    properties: &Path,
    classpath: &str,
    cache_dir: &Path,
    out: &Path,
) -> Result<(), HarnessError> {
    let temp = tempfile::Builder::new()
        .prefix("launcher-tmp-")
        .tempdir_in(cache_dir)
        .map_err(io_error("creating a directory in", cache_dir))?;
    let log_path = cache_dir.join("javac.log");
    let log = File::create(&log_path).map_err(io_error("creating", &log_path))?;
    let log_for_stderr = log.try_clone().map_err(io_error("opening", &log_path))?;
    let status = Command::new("javac")
        .arg("-nowarn")
        .arg("-d")
        .arg(temp.path())
        .arg("-cp")
        .arg(classpath)
        .arg(source)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_for_stderr))
        .status()
        .map_err(|err| HarnessError::Java {
            java: PathBuf::from("javac"),
            detail: format!("{err} (install a JDK 17: scripts/prereqs does)"),
        })?;
    if !status.success() {
        return Err(HarnessError::Java {
            java: PathBuf::from("javac"),
            detail: format!(
                "compiling {} failed ({status}); {}:\n{}",
                source.display(),
                log_path.display(),
                tail_lines(&log_path, LOG_TAIL_LINES)
            ),
        });
    }
    let copied = temp.path().join(LAUNCHER_PROPERTIES);
    fs::copy(properties, &copied).map_err(io_error("copying", properties))?;
    let temp = temp.keep();
    match fs::rename(&temp, out) {
        Ok(()) => Ok(()),
        // Another process compiled the same inputs first: theirs is as good.
        Err(_) if out.join("NacosLauncher.class").is_file() => {
            let _ = fs::remove_dir_all(&temp);
            Ok(())
        }
        Err(err) => Err(io_error("renaming into place", &temp)(err)),
    }
}

/// Runs Maven with the lock held; writes the classpath to a temporary file, checks it and
/// renames it into place.
fn run_maven(
    pom: &Path,
    cache_dir: &Path,
    classpath_file: &Path,
) -> Result<Distribution, HarnessError> {
    let log_path = cache_dir.join("maven.log");
    let log = File::create(&log_path).map_err(io_error("creating", &log_path))?;
    let log_for_stderr = log.try_clone().map_err(io_error("opening", &log_path))?;
    let mut temp_name = classpath_file.as_os_str().to_owned();
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp_file = PathBuf::from(temp_name);
    let mut output_arg = OsString::from("-Dmdep.outputFile=");
    output_arg.push(&temp_file);

    let mut maven = Command::new("mvn")
        .args(["-B", "--no-transfer-progress", "-Dstyle.color=never", "-f"])
        .arg(pom)
        .arg("dependency:build-classpath")
        .arg(output_arg)
        .current_dir(cache_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_for_stderr))
        .spawn()
        .map_err(|source| HarnessError::MavenNotFound { source })?;
    let status = match wait_timeout(&mut maven, MAVEN_TIMEOUT)
        .map_err(io_error("waiting for Maven", pom))?
    {
        Some(status) => status,
        None => {
            // Best effort: the error below is what matters.
            let _ = maven.kill();
            let _ = maven.wait();
            return Err(HarnessError::MavenTimedOut {
                pom: pom.to_path_buf(),
                timeout: MAVEN_TIMEOUT,
                tail: tail_lines(&log_path, LOG_TAIL_LINES),
                log: log_path,
            });
        }
    };
    if !status.success() {
        return Err(HarnessError::MavenFailed {
            pom: pom.to_path_buf(),
            status: status.to_string(),
            tail: tail_lines(&log_path, LOG_TAIL_LINES),
            log: log_path,
        });
    }
    let text = fs::read_to_string(&temp_file)
        .map_err(io_error("reading the classpath Maven wrote", &temp_file))?;
    let dist = match Distribution::parse(&text, classpath_file) {
        Ok(dist) => dist,
        Err(reason) => {
            let _ = fs::remove_file(&temp_file);
            return Err(HarnessError::BadClasspath {
                path: temp_file,
                reason,
            });
        }
    };
    fs::rename(&temp_file, classpath_file).map_err(io_error("renaming into place", &temp_file))?;
    Ok(dist)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classpath_parsing_finds_the_version_and_rejects_missing_jars() {
        let dir = tempfile::tempdir().expect("temp dir");
        let jar = dir.path().join("nacos-console-2.3.2.jar");
        fs::write(&jar, b"").expect("write jar");
        let file = dir.path().join("cp.txt");
        let dist = Distribution::parse(&format!("{}\n", jar.display()), &file).expect("parses");
        assert_eq!(dist.server_version(), "2.3.2");
        let missing = format!(
            "{}:{}",
            jar.display(),
            dir.path().join("gone.jar").display()
        );
        assert!(Distribution::parse(&missing, &file).is_err());
    }
}
