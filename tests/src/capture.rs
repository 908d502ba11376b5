//! Packet captures with tcpdump inside an island's network namespaces.

use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::process::spawn_in;

/// Time allowed for tcpdump to start capturing, and later to exit after SIGINT.
const TCPDUMP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the pcap file must stay the same size before `stop` sends SIGINT.
const SETTLE_QUIET: Duration = Duration::from_millis(100);

/// Upper bound on that wait, for captures that never go quiet.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Interval between polls of the file size and of tcpdump's exit.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A running `tcpdump` that writes the TCP packets of one interface to a pcap file.
///
/// Read the file with [`crate::pcap`] after [`Capture::stop`]. Dropping a capture
/// without `stop` also stops tcpdump but ignores how it exited.
#[derive(Debug)]
pub struct Capture {
    child: Child,
    pcap_path: PathBuf,
    /// Everything tcpdump has written to stderr, for error messages.
    stderr: Arc<Mutex<String>>,
    /// Drains tcpdump's stderr so that tcpdump never blocks on a full pipe.
    stderr_reader: Option<JoinHandle<()>>,
    stopped: bool,
}

impl Capture {
    /// Starts `tcpdump --immediate-mode -B 16384 -Z root -U -n -i IFACE -w PCAP_PATH tcp` in the
    /// network namespace bound at `netns` and returns once tcpdump reports that it is
    /// listening, so that every packet sent after this returns is captured.
    ///
    /// `-Z root` keeps tcpdump from dropping privileges before it opens `pcap_path`, and
    /// `-U` writes each packet as it arrives. Without `--immediate-mode`, libpcap hands
    /// packets over in blocks after a timeout of up to a second, and with tcpdump 4.99.3
    /// and libpcap 1.10.3 the packets of a block not yet handed over were lost when
    /// SIGINT stopped tcpdump. `-B 16384` (KiB) gives the kernel's capture buffer room
    /// for a burst of a multi-megabyte transfer, which the default buffer dropped.
    pub fn start(netns: &Path, iface: &str, pcap_path: &Path) -> io::Result<Capture> {
        let mut command = Command::new("tcpdump");
        command
            .args([
                "--immediate-mode",
                "-B",
                "16384",
                "-Z",
                "root",
                "-U",
                "-n",
                "-i",
                iface,
                "-w",
            ])
            .arg(pcap_path)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_in(netns, None, &mut command)?;

        let stderr_pipe = child
            .stderr
            .take()
            .ok_or_else(|| io::Error::other("tcpdump started without a stderr pipe"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (listening_tx, listening_rx) = mpsc::channel();
        let stderr_reader = {
            let stderr = Arc::clone(&stderr);
            thread::spawn(move || {
                for line in BufReader::new(stderr_pipe).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("listening on") {
                        // The receiver is gone once start has returned; nothing to do then.
                        let _ = listening_tx.send(());
                    }
                    if let Ok(mut text) = stderr.lock() {
                        text.push_str(&line);
                        text.push('\n');
                    }
                }
            })
        };

        let mut capture = Capture {
            child,
            pcap_path: pcap_path.to_owned(),
            stderr,
            stderr_reader: Some(stderr_reader),
            stopped: false,
        };
        match listening_rx.recv_timeout(TCPDUMP_TIMEOUT) {
            Ok(()) => Ok(capture),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                capture.kill_and_wait();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "tcpdump on {iface} in {} did not start listening within {TCPDUMP_TIMEOUT:?}: {}",
                        netns.display(),
                        capture.stderr_text()
                    ),
                ))
            }
            // The reader saw stderr close without the message: tcpdump has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                capture.kill_and_wait();
                Err(io::Error::other(format!(
                    "tcpdump on {iface} in {} exited before listening: {}",
                    netns.display(),
                    capture.stderr_text()
                )))
            }
        }
    }

    /// Path of the pcap file that tcpdump writes.
    pub fn pcap_path(&self) -> &Path {
        &self.pcap_path
    }

    /// Stops tcpdump with SIGINT, so it flushes the file, and waits for it to exit.
    /// Fails when tcpdump does not exit in time or exits with an error.
    ///
    /// Packets that tcpdump has not yet read when SIGINT arrives are lost, so `stop`
    /// first waits until the file has not grown for 100 ms (2 s at most).
    /// NOTE: that wait is a heuristic, so a packet sent right before `stop` can still be
    /// missing from a loaded machine's capture.
    pub fn stop(mut self) -> io::Result<()> {
        self.stopped = true;
        self.wait_for_quiet_file();
        signal(&self.child, libc::SIGINT)?;
        let deadline = Instant::now() + TCPDUMP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                self.kill_and_wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("tcpdump did not exit within {TCPDUMP_TIMEOUT:?} of SIGINT"),
                ));
            }
            thread::sleep(POLL_INTERVAL);
        };
        self.join_stderr_reader();
        if !status.success() {
            return Err(io::Error::other(format!(
                "tcpdump exited with {status}: {}",
                self.stderr_text()
            )));
        }
        Ok(())
    }

    fn wait_for_quiet_file(&self) {
        let file_len = || std::fs::metadata(&self.pcap_path).map_or(0, |meta| meta.len());
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut last_len = file_len();
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline && quiet_since.elapsed() < SETTLE_QUIET {
            thread::sleep(POLL_INTERVAL);
            let len = file_len();
            if len != last_len {
                last_len = len;
                quiet_since = Instant::now();
            }
        }
    }

    fn kill_and_wait(&mut self) {
        self.stopped = true;
        // Both fail only when tcpdump has already exited and been reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_stderr_reader();
    }

    fn join_stderr_reader(&mut self) {
        if let Some(reader) = self.stderr_reader.take() {
            // The pipe closes when tcpdump exits, which ends the reader's loop.
            let _ = reader.join();
        }
    }

    fn stderr_text(&self) -> String {
        match self.stderr.lock() {
            Ok(text) => text.trim_end().to_owned(),
            Err(_) => String::from("(stderr unavailable)"),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if signal(&self.child, libc::SIGINT).is_ok() {
            let deadline = Instant::now() + TCPDUMP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    self.join_stderr_reader();
                    return;
                }
                thread::sleep(POLL_INTERVAL);
            }
        }
        self.kill_and_wait();
    }
}

fn signal(child: &Child, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| io::Error::other(format!("pid {} out of range", child.id())))?;
    // SAFETY: kill(2) only reads its arguments. The child has not been reaped (every
    // wait above comes after the last signal), so the pid still names tcpdump.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
