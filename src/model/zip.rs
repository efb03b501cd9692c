//! A small, bounded zip reader for the two zip-based model formats (PyTorch checkpoints and
//! NumPy `.npz`).
//!
//! We read the archive from a byte slice (the memory-mapped file) rather than through a
//! general zip crate so that every size the file claims is checked against the bytes that back
//! it before anything is allocated, stored members are byte ranges into the map (no copy), and
//! deflated members inflate into a buffer whose size is bounded by the header's promise and by
//! a compression ratio that real arrays never need.

use std::collections::HashSet;
use std::ops::Range;

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const CDH_SIG: u32 = 0x0201_4b50;
const LFH_SIG: u32 = 0x0403_4b50;
const EOCD_LEN: usize = 22;
const CDH_LEN: usize = 46;
const LFH_LEN: usize = 30;

/// Members that inflate to more than this must also respect [`MAX_RATIO`].
const RATIO_FREE_BYTES: u64 = 16 << 20;
/// Largest accepted ratio of inflated to compressed size for large members. Deflate tops out
/// near 1032:1 on constant data; weights, even 90% sparse ones, compress by far less.
pub const MAX_RATIO: u64 = 256;

/// How a member's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Stored,
    Deflated,
}

/// One member of the archive, validated against the archive's bytes.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub method: Method,
    /// Where the member's (possibly compressed) bytes are in the archive.
    pub data: Range<usize>,
    /// The size the member has once inflated, as the central directory promises.
    pub size: u64,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Whether the bytes start like a zip archive (a local header or an empty archive's end record).
pub fn looks_like_zip(buf: &[u8]) -> bool {
    buf.starts_with(b"PK\x03\x04") || buf.starts_with(b"PK\x05\x06")
}

/// Reads the central directory. Errors are one sentence, without the file name (the caller
/// adds it).
pub fn members(buf: &[u8]) -> Result<Vec<Member>, String> {
    let eocd = find_eocd(buf)
        .ok_or("not a zip archive (no end-of-central-directory record; truncated?)")?;
    let short = || "the zip end record is truncated".to_string();
    let mut count = u16_at(buf, eocd + 10).ok_or_else(short)? as u64;
    let mut cd_size = u32_at(buf, eocd + 12).ok_or_else(short)? as u64;
    let mut cd_offset = u32_at(buf, eocd + 16).ok_or_else(short)? as u64;
    // ZIP64: a locator just before the end record points at a 64-bit end record. Writers
    // (PyTorch's among them) may use it even when no field overflows, so follow it whenever it
    // is there.
    if eocd >= 20 && u32_at(buf, eocd - 20) == Some(EOCD64_LOCATOR_SIG) {
        let at = u64_at(buf, eocd - 12).ok_or_else(short)?;
        let at = usize::try_from(at)
            .ok()
            .filter(|&a| a < eocd - 20)
            .ok_or("the ZIP64 locator points outside the file")?;
        if u32_at(buf, at) != Some(EOCD64_SIG) {
            return Err("the ZIP64 end record is missing where the locator points".into());
        }
        let field = |o| u64_at(buf, at + o).ok_or("the ZIP64 end record is truncated");
        count = field(32)?;
        cd_size = field(40)?;
        cd_offset = field(48)?;
    } else if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
        return Err("the zip end record needs a ZIP64 record that is missing".into());
    }
    let cd_end = cd_offset
        .checked_add(cd_size)
        .filter(|&e| e <= buf.len() as u64)
        .ok_or_else(|| {
            format!(
                "the central directory ({cd_size} bytes at offset {cd_offset}) lies outside the {} byte file (truncated?)",
                buf.len()
            )
        })?;
    if count > cd_size / CDH_LEN as u64 {
        return Err(format!(
            "the zip claims {count} members but its central directory has room for {}",
            cd_size / CDH_LEN as u64
        ));
    }
    let (cd_offset, cd_end) = (cd_offset as usize, cd_end as usize);
    let mut out = Vec::with_capacity(count as usize);
    let mut names = HashSet::with_capacity(count as usize);
    let mut at = cd_offset;
    for i in 0..count {
        let bad = |what: &str| format!("zip member #{i}: {what}");
        if u32_at(buf, at) != Some(CDH_SIG) || at + CDH_LEN > cd_end {
            return Err(bad("central directory entry is corrupt"));
        }
        let flags = u16_at(buf, at + 8).unwrap_or(0);
        let method = u16_at(buf, at + 10).unwrap_or(0);
        let mut csize = u32_at(buf, at + 20).unwrap_or(0) as u64;
        let mut usize_ = u32_at(buf, at + 24).unwrap_or(0) as u64;
        let name_len = u16_at(buf, at + 28).unwrap_or(0) as usize;
        let extra_len = u16_at(buf, at + 30).unwrap_or(0) as usize;
        let comment_len = u16_at(buf, at + 32).unwrap_or(0) as usize;
        let mut local = u32_at(buf, at + 42).unwrap_or(0) as u64;
        let name_at = at + CDH_LEN;
        let extra_at = name_at + name_len;
        let next = extra_at + extra_len + comment_len;
        if next > cd_end {
            return Err(bad("central directory entry runs past the directory"));
        }
        let name = String::from_utf8_lossy(&buf[name_at..extra_at]).into_owned();
        let bad = |what: &str| format!("zip member '{name}': {what}");
        // The ZIP64 extra field holds, in this order, only the fields that overflowed.
        let mut extra = &buf[extra_at..extra_at + extra_len];
        while extra.len() >= 4 {
            let id = u16::from_le_bytes([extra[0], extra[1]]);
            let len = u16::from_le_bytes([extra[2], extra[3]]) as usize;
            let Some(body) = extra.get(4..4 + len) else {
                return Err(bad("malformed extra field"));
            };
            if id == 1 {
                let mut o = 0;
                for v in [&mut usize_, &mut csize, &mut local] {
                    if *v == 0xFFFF_FFFF {
                        *v = u64_at(body, o).ok_or_else(|| bad("ZIP64 field is truncated"))?;
                        o += 8;
                    }
                }
            }
            extra = &extra[4 + len..];
        }
        if flags & 1 != 0 {
            return Err(bad("encrypted members are not supported"));
        }
        let method = match method {
            0 => Method::Stored,
            8 => Method::Deflated,
            m => {
                return Err(bad(&format!(
                    "compression method {m} is not supported (only stored and deflate)"
                )));
            }
        };
        // The local header repeats the name and may carry its own extra field (PyTorch pads
        // it so that data is 64-byte aligned): the data starts after both.
        let local = usize::try_from(local)
            .ok()
            .filter(|&l| l < cd_offset.max(1) && u32_at(buf, l) == Some(LFH_SIG))
            .ok_or_else(|| bad("local header is missing or outside the archive"))?;
        let lname = u16_at(buf, local + 26).ok_or_else(|| bad("local header is truncated"))?;
        let lextra = u16_at(buf, local + 28).ok_or_else(|| bad("local header is truncated"))?;
        let start = local + LFH_LEN + lname as usize + lextra as usize;
        let end = (start as u64)
            .checked_add(csize)
            .filter(|&e| e <= buf.len() as u64)
            .ok_or_else(|| {
                bad(&format!(
                    "its {csize} data bytes run past the end of the {} byte file (truncated?)",
                    buf.len()
                ))
            })? as usize;
        if method == Method::Stored && csize != usize_ {
            return Err(bad(&format!(
                "stored member says {csize} bytes stored but {usize_} bytes long"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(bad("appears twice in the archive"));
        }
        out.push(Member {
            name,
            method,
            data: start..end,
            size: usize_,
        });
        at = next;
    }
    Ok(out)
}

fn find_eocd(buf: &[u8]) -> Option<usize> {
    let last = buf.len().checked_sub(EOCD_LEN)?;
    let first = last.saturating_sub(u16::MAX as usize);
    (first..=last).rev().find(|&i| {
        u32_at(buf, i) == Some(EOCD_SIG)
            && u16_at(buf, i + 20).is_some_and(|c| i + EOCD_LEN + c as usize <= buf.len())
    })
}

/// Checks that inflating `m` is allowed: its promised size against the ratio limit. Call
/// before allocating the member's size.
pub fn check_inflate_bounds(m: &Member) -> Result<(), String> {
    if m.method == Method::Deflated && m.size > RATIO_FREE_BYTES {
        let compressed = (m.data.len() as u64).max(1);
        if m.size / compressed >= MAX_RATIO {
            return Err(format!(
                "zip member '{}' would inflate {} compressed bytes to {} bytes, a ratio over {MAX_RATIO}:1 that no real array needs (a decompression bomb?)",
                m.name,
                m.data.len(),
                m.size
            ));
        }
    }
    Ok(())
}

/// Appends the member's inflated bytes to `out`, stopping with an error as soon as it would
/// grow past the size the directory promised, or if it ends short of it.
pub fn inflate_into(buf: &[u8], m: &Member, out: &mut Vec<u8>) -> Result<(), String> {
    let src = &buf[m.data.clone()];
    match m.method {
        Method::Stored => {
            out.extend_from_slice(src);
            Ok(())
        }
        Method::Deflated => {
            check_inflate_bounds(m)?;
            let size = usize::try_from(m.size).map_err(|_| "member too large".to_string())?;
            out.try_reserve_exact(size).map_err(|_| {
                format!(
                    "zip member '{}': cannot allocate {} bytes to inflate it",
                    m.name, m.size
                )
            })?;
            let base = out.len();
            let mut d = flate2::Decompress::new(false);
            let mut chunk = vec![0u8; 1 << 16];
            loop {
                let before_in = d.total_in() as usize;
                let before_out = d.total_out();
                let status = d
                    .decompress(
                        &src[before_in.min(src.len())..],
                        &mut chunk,
                        // Not Finish: with miniz that means "the output fits in one call".
                        flate2::FlushDecompress::None,
                    )
                    .map_err(|e| format!("zip member '{}': corrupt deflate data: {e}", m.name))?;
                let produced = (d.total_out() - before_out) as usize;
                if (out.len() - base + produced) as u64 > m.size {
                    return Err(format!(
                        "zip member '{}' inflates past the {} bytes its header promises",
                        m.name, m.size
                    ));
                }
                out.extend_from_slice(&chunk[..produced]);
                match status {
                    flate2::Status::StreamEnd => break,
                    _ if produced == 0 && d.total_in() as usize == before_in => {
                        return Err(format!(
                            "zip member '{}': deflate data ends early (truncated?)",
                            m.name
                        ));
                    }
                    _ => {}
                }
            }
            if (out.len() - base) as u64 != m.size {
                return Err(format!(
                    "zip member '{}' inflates to {} bytes, not the {} its header promises",
                    m.name,
                    out.len() - base,
                    m.size
                ));
            }
            Ok(())
        }
    }
}

/// Writes a minimal zip of stored members, field by field (fuzz targets wrap their input in
/// one; tests build archives with it). No CRCs: readers of model archives do not check them.
pub fn write_stored_zip(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cd = Vec::new();
    for (name, data) in members {
        let off = out.len() as u32;
        out.extend_from_slice(&LFH_SIG.to_le_bytes());
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        cd.extend_from_slice(&CDH_SIG.to_le_bytes());
        cd.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
        cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
        cd.extend_from_slice(&(name.len() as u16).to_le_bytes());
        cd.extend_from_slice(&[0; 12]);
        cd.extend_from_slice(&off.to_le_bytes());
        cd.extend_from_slice(name.as_bytes());
    }
    let cd_off = out.len() as u32;
    out.extend_from_slice(&cd);
    out.extend_from_slice(&EOCD_SIG.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn stored_members_are_ranges_into_the_archive() {
        let z = write_stored_zip(&[("a/data.pkl", b"hello"), ("a/data/0", b"0123456789")]);
        let m = members(&z).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(&z[m[0].data.clone()], b"hello");
        assert_eq!(m[1].name, "a/data/0");
        assert_eq!(&z[m[1].data.clone()], b"0123456789");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let z = write_stored_zip(&[("x.npy", b"abcdefgh"), ("y.npy", b"ij")]);
        for cut in 0..z.len() {
            let _ = members(&z[..cut]);
        }
        assert!(members(&z[..z.len() - 1]).is_err());
    }

    #[test]
    fn deflate_is_bounded_by_the_promised_size() {
        let raw = vec![7u8; 5000];
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&raw).unwrap();
        let comp = enc.finish().unwrap();
        let buf = comp.clone();
        let mut m = Member {
            name: "w.npy".into(),
            method: Method::Deflated,
            data: 0..buf.len(),
            size: 5000,
        };
        let mut out = Vec::new();
        inflate_into(&buf, &m, &mut out).unwrap();
        assert_eq!(out, raw);
        m.size = 4999;
        let e = inflate_into(&buf, &m, &mut Vec::new()).unwrap_err();
        assert!(e.contains("past the 4999 bytes"), "{e}");
        m.size = 5001;
        let e = inflate_into(&buf, &m, &mut Vec::new()).unwrap_err();
        assert!(e.contains("not the 5001"), "{e}");
        m.size = 1 << 40;
        let e = inflate_into(&buf, &m, &mut Vec::new()).unwrap_err();
        assert!(e.contains("ratio"), "{e}");
    }
}
