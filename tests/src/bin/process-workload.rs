//! A process with known resource use, for the process-stats tests.
//!
//! Protocol with the test: print `ready`; then, for each command line on stdin, do it and print
//! `ok` (or `error: ...`); exit when stdin closes. Between commands the process only waits in a
//! blocking `read` of stdin, so its counters do not move while the test compares readings.
//!
//! Commands:
//! * `alloc MIB`: allocate MIB MiB and write to every page, so all of it is resident;
//! * `burn MILLIS`: spin until this thread has used MILLIS ms of CPU;
//! * `threads N`: start N threads that wait forever;
//! * `files N`: open N more descriptors (of /dev/null);
//! * `nofile N`: set the soft limit on open files to N.
use std::io::{BufRead, Write};
use std::time::Duration;

const PAGE: usize = 4096;

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer to a timespec.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) },
        0
    );
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Kept alive until exit.
#[derive(Default)]
struct Held {
    memory: Vec<Vec<u8>>,
    files: Vec<std::fs::File>,
}

fn run(command: &str, held: &mut Held) -> Result<(), String> {
    let (verb, arg) = command
        .split_once(' ')
        .ok_or_else(|| format!("expected `VERB N`, got {command:?}"))?;
    let n: u64 = arg.parse().map_err(|_| format!("bad number {arg:?}"))?;
    match verb {
        "alloc" => {
            let mut block = vec![0u8; (n as usize) << 20];
            for page in block.chunks_mut(PAGE) {
                page[0] = 1;
            }
            held.memory.push(std::hint::black_box(block));
        }
        "burn" => {
            let until = thread_cpu_time() + Duration::from_millis(n);
            let mut spins = 0u64;
            while thread_cpu_time() < until {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
        }
        "threads" => {
            for _ in 0..n {
                std::thread::spawn(|| {
                    loop {
                        std::thread::park();
                    }
                });
            }
        }
        "files" => {
            for _ in 0..n {
                held.files.push(
                    std::fs::File::open("/dev/null").map_err(|e| format!("open /dev/null: {e}"))?,
                );
            }
        }
        "nofile" => {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: valid out pointer to an rlimit.
            if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
                return Err("getrlimit failed".into());
            }
            limit.rlim_cur = n;
            // SAFETY: valid pointer to an rlimit.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
                return Err(format!("setrlimit({n}) failed"));
            }
        }
        other => return Err(format!("unknown command {other:?}")),
    }
    Ok(())
}

fn main() {
    let mut held = Held::default();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready").unwrap();
    stdout.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        match run(line.trim(), &mut held) {
            Ok(()) => writeln!(stdout, "ok").unwrap(),
            Err(error) => writeln!(stdout, "error: {error}").unwrap(),
        }
        stdout.flush().unwrap();
    }
}
