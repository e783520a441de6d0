//! A process with known syscall behaviour, for the syscall-latency tests.
//!
//! Usage: `syscall-workload MODE COUNT MILLIS`, modes:
//! * `nanosleep`: COUNT `nanosleep` calls of MILLIS ms each;
//! * `pipe-read`: COUNT blocking `read`s from a pipe whose writer thread waits MILLIS ms before
//!   each byte;
//! * `bad-read`: COUNT `read`s of fd -1 (each fails with EBADF).
//!
//! Protocol with the test: print `ready`; then, for each line that arrives on stdin, do the work
//! (timing each call in user space) and print `done` and the measured latencies in ns as one
//! line; exit when stdin closes. Syscalls are made directly through libc so the test
//! knows exactly which ones run.
use std::time::Instant;

fn write_line(text: &str) {
    let line = format!("{text}\n");
    // SAFETY: writes a valid buffer to stdout.
    unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
}

/// Blocks in `read(0)` until a line arrives (true) or stdin closes (false).
fn wait_for_stdin() -> bool {
    let mut buf = [0u8; 64];
    // SAFETY: reads into a valid buffer.
    unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) > 0 }
}

fn nanosleep(millis: u64) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: (millis * 1_000_000) as libc::c_long,
    };
    // SAFETY: valid timespec; a null remainder pointer is allowed.
    unsafe {
        libc::syscall(
            libc::SYS_nanosleep,
            &ts,
            std::ptr::null_mut::<libc::timespec>(),
        )
    };
}

fn timed(f: impl FnOnce()) -> u64 {
    let start = Instant::now();
    f();
    start.elapsed().as_nanos() as u64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, count, millis] = args.as_slice() else {
        panic!("usage: syscall-workload MODE COUNT MILLIS");
    };
    let count: usize = count.parse().expect("COUNT");
    let millis: u64 = millis.parse().expect("MILLIS");

    write_line("ready");
    while wait_for_stdin() {
        let latencies = run(mode, count, millis);
        let list: Vec<String> = latencies.iter().map(u64::to_string).collect();
        write_line(&format!("done {}", list.join(",")));
    }
}

fn run(mode: &str, count: usize, millis: u64) -> Vec<u64> {
    let latencies: Vec<u64> = match mode {
        "nanosleep" => (0..count).map(|_| timed(|| nanosleep(millis))).collect(),
        "pipe-read" => {
            let mut fds = [0i32; 2];
            // SAFETY: valid out array of two fds.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            let [read_fd, write_fd] = fds;
            let writer = std::thread::spawn(move || {
                for _ in 0..count {
                    nanosleep(millis);
                    // SAFETY: writes one byte from a valid buffer to our pipe.
                    unsafe { libc::write(write_fd, b"x".as_ptr().cast(), 1) };
                }
            });
            let mut byte = [0u8; 1];
            let latencies = (0..count)
                .map(|_| {
                    // SAFETY: reads one byte into a valid buffer from our pipe.
                    timed(|| {
                        assert_eq!(
                            unsafe { libc::read(read_fd, byte.as_mut_ptr().cast(), 1) },
                            1
                        )
                    })
                })
                .collect();
            writer.join().unwrap();
            latencies
        }
        "bad-read" => (0..count)
            .map(|_| {
                let mut byte = [0u8; 1];
                // SAFETY: fd -1 is invalid on purpose; the kernel returns EBADF.
                timed(|| assert_eq!(unsafe { libc::read(-1, byte.as_mut_ptr().cast(), 1) }, -1))
            })
            .collect(),
        other => panic!("unknown mode {other}"),
    };
    latencies
}
