//! Small shared helpers: atomic file writes, natural ordering of names, hashing, a seeded RNG.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Writes a file atomically: the content goes to a temporary file in the target's directory,
/// which is flushed, synced and then renamed over the target, so a crash never leaves a
/// half-written file and the old one stays whole until the new one is complete.
///
/// On Linux the temporary file is unnamed (`O_TMPFILE`) until the moment it is complete, so a
/// process killed mid-write leaves nothing behind; it is given a name only for the rename.
/// Elsewhere (or where the file system lacks `O_TMPFILE`) it is a named `.NAME.tmp-PID-N` file,
/// removed on error; leftovers of processes that were killed are swept on the next write.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy()
        .into_owned();
    if let Ok(meta) = std::fs::metadata(path)
        && !meta.is_file()
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "exists and is not a regular file",
        ));
    }
    sweep_stale_temps(&dir, &file_name);
    let (file, named) = create_temp(&dir, &file_name)?;
    let tmp_name = |n: u64| dir.join(temp_name(&file_name, n));
    let mut placed: Option<PathBuf> = named.clone();
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        if placed.is_none() {
            placed = Some(link_unnamed(&file, tmp_name)?);
        }
        let tmp = placed.as_ref().expect("placed above");
        std::fs::rename(tmp, path)?;
        placed = None;
        // The rename is durable only once the directory entry is.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Some(tmp) = placed {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

static TEMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn temp_name(file_name: &str, n: u64) -> String {
    format!(".{file_name}.tmp-{}-{n}", std::process::id())
}

/// Creates the temporary file: unnamed where the OS can (`None`), else a fresh named one.
fn create_temp(dir: &Path, file_name: &str) -> io::Result<(File, Option<PathBuf>)> {
    // The unnamed file is named later through /proc/self/fd; without /proc (some chroots and
    // containers) use a named one from the start.
    #[cfg(target_os = "linux")]
    if Path::new("/proc/self/fd").is_dir() {
        use std::os::unix::fs::OpenOptionsExt;
        let unnamed = std::fs::OpenOptions::new()
            .write(true)
            .mode(0o644)
            .custom_flags(libc::O_TMPFILE)
            .open(dir);
        match unnamed {
            Ok(f) => return Ok((f, None)),
            // Not supported by this file system: fall back to a named file. Real errors
            // (read-only, permission, no space) are the same for both, so report them now.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
                ) => {}
            Err(e) => return Err(e),
        }
    }
    loop {
        let n = TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = dir.join(temp_name(file_name, n));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((f, Some(p))),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Gives an unnamed temporary file a fresh name beside its target.
#[cfg(target_os = "linux")]
fn link_unnamed(file: &File, name: impl Fn(u64) -> PathBuf) -> io::Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::AsRawFd;
    let proc_path = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(io::Error::other)?;
    loop {
        let n = TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let target = name(n);
        let c_target =
            std::ffi::CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                proc_path.as_ptr(),
                libc::AT_FDCWD,
                c_target.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if rc == 0 {
            return Ok(target);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn link_unnamed(_: &File, _: impl Fn(u64) -> PathBuf) -> io::Result<PathBuf> {
    Err(io::Error::other("unnamed temporary files need Linux"))
}

/// Removes `.NAME.tmp-PID-N` files left by processes that no longer run (killed mid-write).
/// Liveness is read from /proc, so this sweeps on Linux only; elsewhere leftovers stay.
fn sweep_stale_temps(dir: &Path, file_name: &str) {
    let prefix = format!(".{file_name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// An OS error as a short phrase: "No such file or directory", without "(os error 2)".
pub fn io_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Memory the OS says it can still give (Linux's MemAvailable), if known.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// Text from a file (a tensor name, say) made safe to print on a terminal: control
/// characters become `\u{..}` escapes, so a name cannot move the cursor, clear the screen or
/// forge a line.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Compares names so that embedded numbers sort by value: `layer.2` < `layer.10`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    // Skip the common prefix, backing up to the start of any digit run it ends inside: names
    // of one model share long prefixes, and sorting a million of them compares them often.
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let mut start = common;
    while start > 0 && a[start - 1].is_ascii_digit() {
        start -= 1;
    }
    a = &a[start..];
    b = &b[start..];
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let ta = trim_zeros(da);
                let tb = trim_zeros(db);
                let ord = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb));
                if ord != Ordering::Equal {
                    return ord;
                }
                let ord = na.cmp(&nb);
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|&&c| c == b'0').count();
    &d[z.min(d.len().saturating_sub(1))..]
}

/// SHA-256 of a byte slice, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    hex(&digest)
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    use sha2::Digest;
    let mut f = File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SplitMix64: a tiny, well-mixed, seedable generator. We own it so that seeded results
/// (random criterion, data split, weight init) never change with a dependency's version.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(1e-300);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// The SplitMix64 finaliser: a stateless hash of one u64.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a string: stable across runs and platforms (unlike `DefaultHasher`).
pub fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Writes all of `bytes`, for use inside [`atomic_write`] closures.
pub fn write_all(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes)
}

/// Formats a byte count for people: 1.5 MB, 230 kB, 12 B.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Formats a count with thousands separators: 22,713,216.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Sets `RAYON_NUM_THREADS` to the count rayon picks anyway (the logical CPUs), where the user
/// has not set it. candle 0.11 asks for its thread count on every CPU matrix product, and
/// without the variable that parses /proc/cpuinfo (`num_cpus::get_physical`), about 30 µs a
/// call: most of a small model's evaluation, and a share of every candle training step. With
/// it, candle's products use the logical CPUs too, where it would otherwise take the physical
/// cores (the same count on this project's 2-vCPU machines, twice as many on SMT desktops).
///
/// # Safety
/// It sets an environment variable: call it before any other thread exists.
pub unsafe fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: the caller guarantees no other thread runs yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_sorts_numbers_by_value() {
        let mut v = vec!["layer.10.w", "layer.2.w", "layer.1.w", "emb", "layer.02.w"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            vec!["emb", "layer.1.w", "layer.2.w", "layer.02.w", "layer.10.w"]
        );
    }

    /// The reference: split into digit and non-digit runs, compare run by run (digit runs by
    /// value, then by length so that `02` follows `2`).
    fn natural_reference(a: &str, b: &str) -> Ordering {
        fn runs(s: &str) -> Vec<(bool, String)> {
            let mut out: Vec<(bool, String)> = Vec::new();
            for c in s.chars() {
                let d = c.is_ascii_digit();
                match out.last_mut() {
                    Some((ld, r)) if *ld == d && d => r.push(c),
                    _ => out.push((d, c.to_string())),
                }
            }
            out
        }
        let (ra, rb) = (runs(a), runs(b));
        for (x, y) in ra.iter().zip(&rb) {
            let ord = match (x.0, y.0) {
                (true, true) => {
                    let tx = x.1.trim_start_matches('0');
                    let ty = y.1.trim_start_matches('0');
                    tx.len()
                        .cmp(&ty.len())
                        .then_with(|| tx.cmp(ty))
                        .then_with(|| x.1.len().cmp(&y.1.len()))
                }
                _ => x.1.as_bytes().cmp(y.1.as_bytes()),
            };
            if ord != Ordering::Equal {
                return ord;
            }
        }
        ra.len().cmp(&rb.len())
    }

    #[test]
    fn natural_order_agrees_with_a_run_by_run_reference() {
        let alphabet = ['a', '.', '0', '1', '2', '9', 'b'];
        let mut rng = SplitMix64::new(7);
        let mut word = || -> String {
            let n = rng.below(7) as usize;
            (0..n).map(|_| alphabet[rng.below(7) as usize]).collect()
        };
        for _ in 0..20_000 {
            let (a, b) = (word(), word());
            let prefix = word();
            let (a, b) = (format!("{prefix}{a}"), format!("{prefix}{b}"));
            assert_eq!(
                natural_cmp(&a, &b),
                natural_reference(&a, &b),
                "{a:?} vs {b:?}"
            );
        }
    }

    #[test]
    fn digits_grouped_and_bytes_humanised() {
        assert_eq!(group_digits(22713216), "22,713,216");
        assert_eq!(group_digits(999), "999");
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1_500_000), "1.50 MB");
    }

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("ps-util-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.bin");
        atomic_write(&p, |w| w.write_all(b"first")).unwrap();
        atomic_write(&p, |w| w.write_all(b"second")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let failed = atomic_write(&p, |_| Err(io::Error::other("boom")));
        assert!(failed.is_err());
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b"second",
            "failed write kept old file"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
