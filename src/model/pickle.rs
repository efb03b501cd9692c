//! A bounded pickle reader for PyTorch's `data.pkl`.
//!
//! It runs the pickle machine without calling anything: globals stay names, calls stay
//! records of (callable, arguments). Objects live in one flat arena and the stack, the memo
//! and containers hold indices into it, so
//! - a memo entry used a million times costs a million indices, never a copy (candle's reader
//!   deep-copies on every use, which lets a 1 kB file grow to gigabytes);
//! - nothing recurses while reading, so nesting depth cannot overflow the stack, and dropping
//!   the arena is flat;
//! - memory and time are linear in the input: each opcode adds at most one object and moves
//!   each stack item at most once.
//!
//! Readers of the result walk it with explicit depth limits (see [`Pickle::depth_ok`]).

use std::collections::HashMap;

/// An index into the arena.
pub type Id = u32;

#[derive(Debug, Clone)]
pub enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64 (kept only so that it can be reported).
    BigInt,
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)`, with what later opcodes added to the result: dict items
    /// (`SETITEMS` on an `OrderedDict`), list items, and the `BUILD` state.
    Call {
        func: Id,
        args: Id,
        items: Vec<(Id, Id)>,
        appended: Vec<Id>,
        state: Option<Id>,
    },
    /// A persistent id: PyTorch's reference to a storage record.
    PersId(Id),
}

/// A read pickle: the arena and the id of the object `STOP` returned.
pub struct Pickle {
    pub objs: Vec<Obj>,
    pub root: Id,
}

impl Pickle {
    pub fn get(&self, id: Id) -> &Obj {
        &self.objs[id as usize]
    }
    /// Dict-like items of an object: a dict, or a call (an `OrderedDict`) that received items.
    pub fn dict_items(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.get(id) {
            Obj::Dict(items) => Some(items),
            Obj::Call { items, func, .. } if matches!(self.get(*func), Obj::Global { name, .. } if name.ends_with("Dict")) => {
                Some(items)
            }
            _ => None,
        }
    }
    pub fn as_str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self, id: Id) -> Option<i64> {
        match self.get(id) {
            Obj::Int(i) => Some(*i),
            Obj::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    pub fn as_tuple(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Obj::Tuple(v) | Obj::List(v) => Some(v),
            _ => None,
        }
    }
    /// `(module, name)` of a global.
    pub fn as_global(&self, id: Id) -> Option<(&str, &str)> {
        match self.get(id) {
            Obj::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }
    /// Always true while `depth` is under the limit that walkers of the result respect.
    pub fn depth_ok(depth: usize) -> bool {
        depth < MAX_WALK_DEPTH
    }
}

/// Deepest a walker of the result may go (tensor records are a handful of levels deep).
pub const MAX_WALK_DEPTH: usize = 64;

/// Longest module or class name a global may have: globals are copied out of strings, so a
/// long one reused through the memo would multiply memory.
const MAX_GLOBAL_BYTES: usize = 1024;

/// Most objects the arena holds (about 70 bytes each): a state dict of a million tensors needs
/// some twenty million.
const MAX_OBJECTS: usize = 1 << 25;

#[derive(Debug, thiserror::Error)]
#[error("pickle: {msg} at byte {pos}")]
pub struct PickleError {
    pub msg: String,
    pub pos: usize,
}

struct Machine<'a> {
    buf: &'a [u8],
    pos: usize,
    objs: Vec<Obj>,
    stack: Vec<Id>,
    /// Stack lengths at each `MARK`.
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

/// Reads a whole pickle. Fails on truncated input, unknown or unsupported opcodes, and stack
/// misuse; never panics, whatever the bytes.
pub fn read(buf: &[u8]) -> Result<Pickle, PickleError> {
    let mut m = Machine {
        buf,
        pos: 0,
        objs: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = m.run()?;
    Ok(Pickle { objs: m.objs, root })
}

impl<'a> Machine<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            msg: msg.into(),
            pos: self.pos,
        })
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return self.err(format!("truncated: {n} more bytes needed"));
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let s = self.take(N)?;
        Ok(s.try_into().unwrap_or([0; N]))
    }
    fn len_prefixed(&mut self, n: u64) -> Result<&'a [u8], PickleError> {
        match usize::try_from(n) {
            Ok(n) => self.take(n),
            Err(_) => self.err(format!("length {n} is larger than the file")),
        }
    }
    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let rest = &self.buf[self.pos..];
        let Some(nl) = rest.iter().position(|&c| c == b'\n') else {
            return self.err("truncated: text argument without newline");
        };
        self.pos += nl + 1;
        Ok(&rest[..nl])
    }
    fn utf8(&self, b: &[u8]) -> Result<String, PickleError> {
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => self.err("string is not valid UTF-8"),
        }
    }
    fn new_obj(&mut self, o: Obj) -> Result<Id, PickleError> {
        if self.objs.len() >= MAX_OBJECTS {
            return self.err(format!("more than {MAX_OBJECTS} objects"));
        }
        if self.objs.try_reserve(1).is_err() {
            return self.err("out of memory for the pickle's objects");
        }
        let id = self.objs.len() as Id;
        self.objs.push(o);
        Ok(id)
    }
    fn global(&self, module: String, name: String) -> Result<Obj, PickleError> {
        if module.len() > MAX_GLOBAL_BYTES || name.len() > MAX_GLOBAL_BYTES {
            return self.err("a global name is too long");
        }
        Ok(Obj::Global { module, name })
    }
    fn push(&mut self, o: Obj) -> Result<(), PickleError> {
        let id = self.new_obj(o)?;
        self.stack.push(id);
        Ok(())
    }
    fn pop(&mut self) -> Result<Id, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        Ok(self.stack.pop().unwrap_or(0))
    }
    fn top(&self) -> Result<Id, PickleError> {
        match self.stack.last() {
            Some(&t) if self.stack.len() > self.marks.last().copied().unwrap_or(0) => Ok(t),
            _ => self.err("stack underflow"),
        }
    }
    /// Pops everything down to the last mark, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let Some(at) = self.marks.pop() else {
            return self.err("no MARK on the stack");
        };
        Ok(self.stack.split_off(at.min(self.stack.len())))
    }
    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => self.err(format!("memo key {key} was never stored")),
        }
    }
    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let t = self.top()?;
        self.memo.insert(key, t);
        Ok(())
    }
    fn int_text(&self, s: &[u8]) -> Result<Obj, PickleError> {
        let s = std::str::from_utf8(s).unwrap_or("").trim_end_matches('L');
        match s {
            "00" => return Ok(Obj::Bool(false)),
            "01" => return Ok(Obj::Bool(true)),
            _ => {}
        }
        match s.parse::<i64>() {
            Ok(v) => Ok(Obj::Int(v)),
            Err(_)
                if !s.is_empty()
                    && s.trim_start_matches('-')
                        .bytes()
                        .all(|c| c.is_ascii_digit()) =>
            {
                Ok(Obj::BigInt)
            }
            Err(_) => self.err(format!("bad integer literal {s:?}")),
        }
    }
    fn long_bytes(b: &[u8]) -> Obj {
        if b.is_empty() {
            return Obj::Int(0);
        }
        if b.len() > 8 {
            return Obj::BigInt;
        }
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut a = [if neg { 0xFF } else { 0 }; 8];
        a[..b.len()].copy_from_slice(b);
        Obj::Int(i64::from_le_bytes(a))
    }
    /// Adds `(key, value)` pairs to the dict-like object at `target`.
    fn set_items(&mut self, target: Id, kv: Vec<Id>) -> Result<(), PickleError> {
        if !kv.len().is_multiple_of(2) {
            return self.err("SETITEMS with an odd number of items");
        }
        let pairs = kv.chunks_exact(2).map(|c| (c[0], c[1]));
        match &mut self.objs[target as usize] {
            Obj::Dict(items) | Obj::Call { items, .. } => {
                items.extend(pairs);
                Ok(())
            }
            _ => self.err("SETITEM(S) on an object that is not a dict"),
        }
    }
    fn append_items(&mut self, target: Id, v: Vec<Id>) -> Result<(), PickleError> {
        match &mut self.objs[target as usize] {
            Obj::List(items)
            | Obj::Set(items)
            | Obj::Call {
                appended: items, ..
            } => {
                items.extend(v);
                Ok(())
            }
            _ => self.err("APPEND(S) on an object that is not a list"),
        }
    }
    fn call(&mut self, func: Id, args: Id) -> Result<(), PickleError> {
        self.push(Obj::Call {
            func,
            args,
            items: Vec::new(),
            appended: Vec::new(),
            state: None,
        })
    }

    fn run(&mut self) -> Result<Id, PickleError> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return self.err(format!("pickle protocol {v} is not supported"));
                    }
                }
                0x95 => {
                    self.le::<8>()?; // FRAME: a length hint only
                }
                b'.' => {
                    let root = self.pop()?;
                    return Ok(root);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.stack.push(t);
                }
                b'N' => self.push(Obj::None)?,
                0x88 => self.push(Obj::Bool(true))?,
                0x89 => self.push(Obj::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Obj::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v as i64))?
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Obj::Int(v as i64))?
                }
                0x8a => {
                    let n = self.u8()? as u64;
                    let b = self.len_prefixed(n)?;
                    self.push(Self::long_bytes(b))?
                }
                0x8b => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let b = self.len_prefixed(n)?;
                    self.push(Self::long_bytes(b))?
                }
                b'I' | b'L' => {
                    let l = self.line()?;
                    let o = self.int_text(l)?;
                    self.push(o)?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Obj::Float(v))?
                }
                b'F' => {
                    let l = self.line()?;
                    let Some(v) = std::str::from_utf8(l).ok().and_then(|s| s.parse().ok()) else {
                        return self.err("bad float literal");
                    };
                    self.push(Obj::Float(v))?
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let b = self.len_prefixed(n)?;
                    let s = self.utf8(b)?;
                    self.push(Obj::Str(s))?
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let b = self.len_prefixed(n)?;
                    let s = self.utf8(b)?;
                    self.push(Obj::Str(s))?
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.le()?);
                    let b = self.len_prefixed(n)?;
                    let s = self.utf8(b)?;
                    self.push(Obj::Str(s))?
                }
                b'V' => {
                    // Protocol 0 unicode (raw-unicode-escape); names in state dicts are ASCII.
                    let l = self.line()?;
                    let s = String::from_utf8_lossy(l).into_owned();
                    self.push(Obj::Str(s))?
                }
                b'S' => {
                    let l = self.line()?;
                    let s = String::from_utf8_lossy(l);
                    let s = s.trim_matches(|c| c == '\'' || c == '"').to_string();
                    self.push(Obj::Str(s))?
                }
                b'T' | b'B' => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let b = self.len_prefixed(n)?.to_vec();
                    self.push(if op == b'T' {
                        Obj::Str(String::from_utf8_lossy(&b).into_owned())
                    } else {
                        Obj::Bytes(b)
                    })?
                }
                b'U' | b'C' => {
                    let n = self.u8()? as u64;
                    let b = self.len_prefixed(n)?.to_vec();
                    self.push(if op == b'U' {
                        Obj::Str(String::from_utf8_lossy(&b).into_owned())
                    } else {
                        Obj::Bytes(b)
                    })?
                }
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(self.le()?);
                    let b = self.len_prefixed(n)?.to_vec();
                    self.push(Obj::Bytes(b))?
                }
                b')' => self.push(Obj::Tuple(Vec::new()))?,
                b't' => {
                    let v = self.pop_mark()?;
                    self.push(Obj::Tuple(v))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return self.err("stack underflow");
                    }
                    let v = self.stack.split_off(self.stack.len() - n);
                    self.push(Obj::Tuple(v))?
                }
                b']' => self.push(Obj::List(Vec::new()))?,
                b'l' => {
                    let v = self.pop_mark()?;
                    self.push(Obj::List(v))?
                }
                b'}' => self.push(Obj::Dict(Vec::new()))?,
                b'd' => {
                    let v = self.pop_mark()?;
                    let id = self.new_obj(Obj::Dict(Vec::new()))?;
                    self.set_items(id, v)?;
                    self.stack.push(id);
                }
                0x8f => self.push(Obj::Set(Vec::new()))?,
                0x91 => {
                    let v = self.pop_mark()?;
                    self.push(Obj::Set(v))?
                }
                b'a' => {
                    let v = self.pop()?;
                    let t = self.top()?;
                    self.append_items(t, vec![v])?
                }
                b'e' | 0x90 => {
                    let v = self.pop_mark()?;
                    let t = self.top()?;
                    self.append_items(t, v)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let t = self.top()?;
                    self.set_items(t, vec![k, v])?
                }
                b'u' => {
                    let v = self.pop_mark()?;
                    let t = self.top()?;
                    self.set_items(t, v)?
                }
                b'c' => {
                    let module = self.line()?;
                    let module = self.utf8(module)?;
                    let name = self.line()?;
                    let name = self.utf8(name)?;
                    let g = self.global(module, name)?;
                    self.push(g)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(module), Obj::Str(name)) =
                        (&self.objs[module as usize], &self.objs[name as usize])
                    else {
                        return self.err("STACK_GLOBAL needs two strings");
                    };
                    let g = self.global(module.clone(), name.clone())?;
                    self.push(g)?
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    self.call(func, args)?
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let func = self.pop()?;
                    self.call(func, args)?
                }
                b'i' => {
                    let module = self.line()?;
                    let module = self.utf8(module)?;
                    let name = self.line()?;
                    let name = self.utf8(name)?;
                    let v = self.pop_mark()?;
                    let g = self.global(module, name)?;
                    let func = self.new_obj(g)?;
                    let args = self.new_obj(Obj::Tuple(v))?;
                    self.call(func, args)?
                }
                b'o' => {
                    let mut v = self.pop_mark()?;
                    if v.is_empty() {
                        return self.err("OBJ without a class");
                    }
                    let func = v.remove(0);
                    let args = self.new_obj(Obj::Tuple(v))?;
                    self.call(func, args)?
                }
                b'b' => {
                    let state = self.pop()?;
                    let t = self.top()?;
                    // BUILD on anything but a call sets attributes we do not read.
                    if let Obj::Call { state: s, .. } = &mut self.objs[t as usize] {
                        *s = Some(state);
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(Obj::PersId(pid))?
                }
                b'P' => {
                    let l = self.line()?;
                    let s = String::from_utf8_lossy(l).into_owned();
                    let pid = self.new_obj(Obj::Str(s))?;
                    self.push(Obj::PersId(pid))?
                }
                b'h' => {
                    let k = self.u8()? as u64;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?) as u64;
                    self.memo_get(k)?
                }
                b'g' => {
                    let l = self.line()?;
                    let Some(k) = std::str::from_utf8(l).ok().and_then(|s| s.parse().ok()) else {
                        return self.err("bad GET index");
                    };
                    self.memo_get(k)?
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?) as u64;
                    self.memo_put(k)?
                }
                b'p' => {
                    let l = self.line()?;
                    let Some(k) = std::str::from_utf8(l).ok().and_then(|s| s.parse().ok()) else {
                        return self.err("bad PUT index");
                    };
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?
                }
                other => {
                    self.pos -= 1;
                    return self.err(format!("unsupported pickle opcode 0x{other:02x}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_protocol_2_dict_hand_assembled() {
        // pickle.dumps({'a': 1, 'b': (2, 'x')}, protocol=2), spelled out opcode by opcode.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02K\x02X\x01\x00\x00\x00xq\x03\x86q\x04u.";
        let r = read(p).unwrap();
        let items = r.dict_items(r.root).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(r.as_str(items[0].0), Some("a"));
        assert_eq!(r.as_int(items[0].1), Some(1));
        let t = r.as_tuple(items[1].1).unwrap();
        assert_eq!(r.as_int(t[0]), Some(2));
        assert_eq!(r.as_str(t[1]), Some("x"));
    }

    #[test]
    fn memo_reuse_shares_instead_of_copying() {
        // A list, memoised, then appended to a new list 100,000 times through BINGET: the
        // arena holds two lists and one string, not 100,000 copies.
        let mut p = b"\x80\x02]q\x00X\x03\x00\x00\x00abca".to_vec();
        p.extend_from_slice(b"]q\x01(");
        for _ in 0..100_000 {
            p.extend_from_slice(b"h\x00");
        }
        p.extend_from_slice(b"e.");
        let r = read(&p).unwrap();
        assert!(r.objs.len() < 10, "{} objects", r.objs.len());
        match r.get(r.root) {
            Obj::List(v) => assert_eq!(v.len(), 100_000),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn deep_nesting_reads_without_recursion() {
        // 200,000 nested one-tuples: `(` … `)` as TUPLE1 chains.
        let mut p = b"\x80\x02N".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 200_000));
        p.push(b'.');
        let r = read(&p).unwrap();
        assert_eq!(r.objs.len(), 200_001);
    }

    #[test]
    fn every_prefix_and_garbage_fails_cleanly() {
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01u.";
        for cut in 0..p.len() {
            assert!(read(&p[..cut]).is_err());
        }
        for bad in [
            &b"\x80\x02h\x05."[..],
            b"0",
            b"\x80\x09N.",
            b"u",
            b"\xff",
            b"(t(.",
        ] {
            assert!(read(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ints_of_every_width() {
        let p = b"\x80\x02(J\xff\xff\xff\xffK\xffM\x00\x01\x8a\x02\x00\x80\x8a\x09\x01\x01\x01\x01\x01\x01\x01\x01\x01I42\nt.";
        let r = read(p).unwrap();
        let t = r.as_tuple(r.root).unwrap();
        let v: Vec<Option<i64>> = t.iter().map(|&i| r.as_int(i)).collect();
        assert_eq!(
            v,
            vec![Some(-1), Some(255), Some(256), Some(-32768), None, Some(42)]
        );
    }
}
