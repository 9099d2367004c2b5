//! A data-only pickle reader (protocols 0–5, the opcodes `torch.save` and numpy/`pickle.dump`
//! of plain data emit).
//!
//! Why not a full unpickler: loading a pickle means calling whatever callables it names, so a
//! checkpoint from the internet could run `os.system`. This reader never calls anything. It
//! builds a tree of [`Obj`]s in which a call (`REDUCE`, `NEWOBJ`) is just recorded with its
//! callable and arguments, and `GLOBAL` is refused unless the caller's allow-list has the exact
//! `module.name`. The callers (`checkpoint::torch`, `data::cifar`) then interpret the few
//! calls they allow (`_rebuild_tensor_v2`, numpy's `_reconstruct`, …) as data.
//!
//! Python object identity matters for mutable containers (a dict is memoised before its items
//! are set), so lists, dicts and call results live in an arena and are referred to by index
//! until [`Pickle::resolve`] turns the root into an owned tree.

use std::rc::Rc;

/// A pickle-level value on the stack or in the memo.
#[derive(Clone, Debug)]
enum Val {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<Vec<u8>>),
    Tuple(Rc<Vec<Val>>),
    Global(Rc<(String, String)>),
    PersId(Rc<Val>),
    /// A list, dict or call result in the arena.
    Ref(usize),
    Mark,
}

#[derive(Debug)]
enum Node {
    List(Vec<Val>),
    Dict(Vec<(Val, Val)>),
    Call { func: Val, args: Val, state: Option<Val> },
}

/// The owned result tree.
#[derive(Clone, Debug, PartialEq)]
pub enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Rc<Vec<u8>>),
    Tuple(Vec<Obj>),
    List(Vec<Obj>),
    /// Insertion order kept (`OrderedDict`s are dicts here).
    Dict(Vec<(Obj, Obj)>),
    Global {
        module: String,
        name: String,
    },
    /// `func(*args)`, with the state a later `BUILD` gave it.
    Call {
        func: Box<Obj>,
        args: Box<Obj>,
        state: Option<Box<Obj>>,
    },
    /// A persistent id (`BINPERSID`): torch's storage references.
    PersId(Box<Obj>),
}

impl Obj {
    /// A dict's value for a string key (str or, as in Python-2 pickles, bytes).
    pub fn get(&self, key: &str) -> Option<&Obj> {
        match self {
            Obj::Dict(items) => items.iter().find(|(k, _)| k.as_text() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Text of a str, or of bytes that are UTF-8 (Python-2 `str`).
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Obj::Str(s) => Some(s),
            Obj::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Obj::Int(i) => Some(*i),
            Obj::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// Items of a tuple or list.
    pub fn as_seq(&self) -> Option<&[Obj]> {
        match self {
            Obj::Tuple(v) | Obj::List(v) => Some(v),
            _ => None,
        }
    }

    /// `Some((module, name))` for a call of a global.
    pub fn call_target(&self) -> Option<(&str, &str)> {
        match self {
            Obj::Call { func, .. } => match func.as_ref() {
                Obj::Global { module, name } => Some((module, name)),
                _ => None,
            },
            _ => None,
        }
    }

    /// A short description for error messages.
    pub fn kind(&self) -> String {
        match self {
            Obj::None => "None".into(),
            Obj::Bool(_) => "bool".into(),
            Obj::Int(_) => "int".into(),
            Obj::Float(_) => "float".into(),
            Obj::Str(_) => "str".into(),
            Obj::Bytes(_) => "bytes".into(),
            Obj::Tuple(_) => "tuple".into(),
            Obj::List(_) => "list".into(),
            Obj::Dict(_) => "dict".into(),
            Obj::Global { module, name } => format!("{module}.{name}"),
            Obj::Call { .. } => match self.call_target() {
                Some((m, n)) => format!("{m}.{n}(…)"),
                None => "call".into(),
            },
            Obj::PersId(_) => "persistent id".into(),
        }
    }
}

/// Why a pickle was rejected. `offset` is the byte position of the offending opcode.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum PickleError {
    #[error("refusing pickle global {module}.{name} (only {allowed} globals are allowed)")]
    RefusedGlobal { module: String, name: String, allowed: &'static str, offset: usize },
    #[error("pickle ends early at byte {offset} (truncated file?)")]
    Truncated { offset: usize },
    #[error("unsupported pickle opcode 0x{opcode:02x} at byte {offset}")]
    Opcode { opcode: u8, offset: usize },
    #[error("malformed pickle at byte {offset}: {msg}")]
    Malformed { offset: usize, msg: String },
}

/// The globals a pickle may name: exact `(module, name)` pairs, plus a label for errors
/// ("state-dict", "numpy array").
pub struct Allow {
    pub pairs: &'static [(&'static str, &'static str)],
    pub label: &'static str,
}

/// A parsed pickle: the arena and the root value.
pub struct Pickle {
    nodes: Vec<Node>,
    root: Val,
}

/// Depth limit of [`Pickle::resolve`]: real state dicts nest 4–5 levels; a cycle or a
/// pathological file must not overflow the stack.
const MAX_DEPTH: usize = 64;

impl Pickle {
    /// Parses `data` without calling anything. `allow` lists the permitted globals.
    pub fn parse(data: &[u8], allow: &Allow) -> Result<Pickle, PickleError> {
        Parser { d: data, pos: 0, stack: Vec::new(), memo: Vec::new(), nodes: Vec::new(), allow }.run()
    }

    /// The root as an owned tree. Shared sub-objects are copied (bytes are shared by `Rc`).
    pub fn resolve(&self) -> Result<Obj, PickleError> {
        self.obj(&self.root, 0)
    }

    fn obj(&self, v: &Val, depth: usize) -> Result<Obj, PickleError> {
        if depth > MAX_DEPTH {
            return Err(PickleError::Malformed { offset: 0, msg: "objects nest too deeply (cycle?)".into() });
        }
        let d = depth + 1;
        Ok(match v {
            Val::None => Obj::None,
            Val::Bool(b) => Obj::Bool(*b),
            Val::Int(i) => Obj::Int(*i),
            Val::Float(f) => Obj::Float(*f),
            Val::Str(s) => Obj::Str(s.to_string()),
            Val::Bytes(b) => Obj::Bytes(b.clone()),
            Val::Tuple(t) => Obj::Tuple(t.iter().map(|x| self.obj(x, d)).collect::<Result<_, _>>()?),
            Val::Global(g) => Obj::Global { module: g.0.clone(), name: g.1.clone() },
            Val::PersId(p) => Obj::PersId(Box::new(self.obj(p, d)?)),
            Val::Mark => return Err(PickleError::Malformed { offset: 0, msg: "stray MARK in result".into() }),
            Val::Ref(i) => match &self.nodes[*i] {
                Node::List(items) => Obj::List(items.iter().map(|x| self.obj(x, d)).collect::<Result<_, _>>()?),
                Node::Dict(items) => Obj::Dict(
                    items.iter().map(|(k, v)| Ok((self.obj(k, d)?, self.obj(v, d)?))).collect::<Result<_, _>>()?,
                ),
                Node::Call { func, args, state } => Obj::Call {
                    func: Box::new(self.obj(func, d)?),
                    args: Box::new(self.obj(args, d)?),
                    state: match state {
                        Some(s) => Some(Box::new(self.obj(s, d)?)),
                        None => None,
                    },
                },
            },
        })
    }
}

struct Parser<'a> {
    d: &'a [u8],
    pos: usize,
    stack: Vec<Val>,
    memo: Vec<Option<Val>>,
    nodes: Vec<Node>,
    allow: &'a Allow,
}

impl<'a> Parser<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        if self.d.len() - self.pos < n {
            return Err(PickleError::Truncated { offset: self.d.len() });
        }
        let s = &self.d[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<usize, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
    }
    fn u32(&mut self) -> Result<usize, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn u64(&mut self) -> Result<usize, PickleError> {
        let b = self.take(8)?;
        let v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        usize::try_from(v).map_err(|_| PickleError::Malformed { offset: self.pos, msg: "length overflows".into() })
    }
    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.d[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or(PickleError::Truncated { offset: self.d.len() })?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| self.bad("non-UTF-8 text line"))
    }
    fn bad(&self, msg: &str) -> PickleError {
        PickleError::Malformed { offset: self.pos, msg: msg.to_string() }
    }
    fn pop(&mut self) -> Result<Val, PickleError> {
        match self.stack.pop() {
            Some(Val::Mark) | None => Err(self.bad("stack underflow")),
            Some(v) => Ok(v),
        }
    }
    fn top(&mut self) -> Result<&mut Val, PickleError> {
        let pos = self.pos;
        self.stack.last_mut().ok_or(PickleError::Malformed { offset: pos, msg: "empty stack".into() })
    }
    /// Items above the topmost MARK (which is removed).
    fn pop_mark(&mut self) -> Result<Vec<Val>, PickleError> {
        let m = self.stack.iter().rposition(|v| matches!(v, Val::Mark)).ok_or_else(|| self.bad("no MARK"))?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items)
    }
    fn node(&mut self, n: Node) -> Val {
        self.nodes.push(n);
        Val::Ref(self.nodes.len() - 1)
    }
    fn put(&mut self, idx: usize) -> Result<(), PickleError> {
        let v = self.stack.last().cloned().ok_or_else(|| self.bad("PUT on empty stack"))?;
        if idx > 1 << 26 {
            return Err(self.bad("memo index too large"));
        }
        if self.memo.len() <= idx {
            self.memo.resize(idx + 1, None);
        }
        self.memo[idx] = Some(v);
        Ok(())
    }
    fn get(&mut self, idx: usize) -> Result<(), PickleError> {
        let v = self.memo.get(idx).cloned().flatten().ok_or_else(|| self.bad("GET of an unset memo slot"))?;
        self.stack.push(v);
        Ok(())
    }
    fn global(&mut self, module: &str, name: &str, at: usize) -> Result<Val, PickleError> {
        if self.allow.pairs.iter().any(|&(m, n)| m == module && n == name) {
            Ok(Val::Global(Rc::new((module.to_string(), name.to_string()))))
        } else {
            Err(PickleError::RefusedGlobal {
                module: module.to_string(),
                name: name.to_string(),
                allowed: self.allow.label,
                offset: at,
            })
        }
    }
    fn set_items(&mut self, target: &Val, kv: Vec<Val>) -> Result<(), PickleError> {
        if kv.len() % 2 == 1 {
            return Err(self.bad("odd number of items for SETITEMS"));
        }
        let pos = self.pos;
        match target {
            Val::Ref(i) => match &mut self.nodes[*i] {
                Node::Dict(items) => {
                    let mut it = kv.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        items.push((k, v));
                    }
                    Ok(())
                }
                _ => Err(PickleError::Malformed { offset: pos, msg: "SETITEM on a non-dict".into() }),
            },
            _ => Err(PickleError::Malformed { offset: pos, msg: "SETITEM on a non-dict".into() }),
        }
    }
    fn append(&mut self, target: &Val, vals: Vec<Val>) -> Result<(), PickleError> {
        let pos = self.pos;
        match target {
            Val::Ref(i) => match &mut self.nodes[*i] {
                Node::List(items) => {
                    items.extend(vals);
                    Ok(())
                }
                _ => Err(PickleError::Malformed { offset: pos, msg: "APPEND on a non-list".into() }),
            },
            _ => Err(PickleError::Malformed { offset: pos, msg: "APPEND on a non-list".into() }),
        }
    }
    /// `func(*args)`: `collections.OrderedDict()` becomes a dict so that SETITEMS work on it;
    /// anything else is recorded, not called.
    fn call(&mut self, func: Val, args: Val) -> Val {
        if let (Val::Global(g), Val::Tuple(a)) = (&func, &args) {
            if g.0 == "collections" && g.1 == "OrderedDict" && a.is_empty() {
                return self.node(Node::Dict(Vec::new()));
            }
        }
        self.node(Node::Call { func, args, state: None })
    }

    fn run(mut self) -> Result<Pickle, PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.bad(&format!("pickle protocol {p} is newer than 5")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => {
                    let root = self.pop()?;
                    return Ok(Pickle { nodes: self.nodes, root });
                }
                b'(' => self.stack.push(Val::Mark),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Val::None),
                0x88 => self.stack.push(Val::Bool(true)),
                0x89 => self.stack.push(Val::Bool(false)),
                b'J' => {
                    let b = self.take(4)?;
                    self.stack.push(Val::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Val::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Val::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? };
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(self.bad("integer wider than 64 bits"));
                    }
                    let neg = n > 0 && b[n - 1] & 0x80 != 0;
                    let mut buf = if neg { [0xffu8; 8] } else { [0u8; 8] };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Val::Int(i64::from_le_bytes(buf)));
                }
                b'I' | b'L' => {
                    let l = self.line()?.trim_end_matches('L');
                    let v = match l {
                        "01" => Val::Bool(true),
                        "00" => Val::Bool(false),
                        _ => Val::Int(l.parse().map_err(|_| self.bad("bad INT literal"))?),
                    };
                    self.stack.push(v);
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.stack.push(Val::Float(f64::from_be_bytes(b.try_into().expect("8 bytes"))));
                }
                b'F' => {
                    let l = self.line()?;
                    self.stack.push(Val::Float(l.parse().map_err(|_| self.bad("bad FLOAT literal"))?));
                }
                b'U' | b'T' | b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'U' | b'C' => self.u8()? as usize,
                        b'T' | b'B' => self.u32()?,
                        _ => self.u64()?,
                    };
                    let b = self.take(n)?;
                    self.stack.push(Val::Bytes(Rc::new(b.to_vec())));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => self.u8()? as usize,
                        b'X' => self.u32()?,
                        _ => self.u64()?,
                    };
                    let b = self.take(n)?;
                    let s = std::str::from_utf8(b).map_err(|_| self.bad("invalid UTF-8 in a str"))?;
                    self.stack.push(Val::Str(Rc::from(s)));
                }
                b')' => self.stack.push(Val::Tuple(Rc::new(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Val::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Val::Tuple(Rc::new(items)));
                }
                b']' => {
                    let v = self.node(Node::List(Vec::new()));
                    self.stack.push(v);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.node(Node::List(items));
                    self.stack.push(v);
                }
                b'a' => {
                    let v = self.pop()?;
                    let t = self.top()?.clone();
                    self.append(&t, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let t = self.top()?.clone();
                    self.append(&t, items)?;
                }
                b'}' => {
                    let v = self.node(Node::Dict(Vec::new()));
                    self.stack.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let v = self.node(Node::Dict(Vec::new()));
                    self.set_items(&v, items)?;
                    self.stack.push(v);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let t = self.top()?.clone();
                    self.set_items(&t, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let t = self.top()?.clone();
                    self.set_items(&t, items)?;
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    let g = self.global(&module, &name, at)?;
                    self.stack.push(g);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Val::Str(m), Val::Str(n)) => {
                            let g = self.global(&m, &n, at)?;
                            self.stack.push(g);
                        }
                        _ => return Err(self.bad("STACK_GLOBAL needs two strs")),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args);
                    self.stack.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args);
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    let pos = self.pos;
                    match self.top()?.clone() {
                        Val::Ref(i) => match &mut self.nodes[i] {
                            Node::Call { state: s, .. } => *s = Some(state),
                            // `OrderedDict` instance attributes (torch's `_metadata`): not data.
                            Node::Dict(_) => {}
                            Node::List(_) => {
                                return Err(PickleError::Malformed { offset: pos, msg: "BUILD on a list".into() })
                            }
                        },
                        _ => return Err(PickleError::Malformed { offset: pos, msg: "BUILD on a non-object".into() }),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(Val::PersId(Rc::new(pid)));
                }
                b'P' => {
                    let pid = self.line()?;
                    self.stack.push(Val::PersId(Rc::new(Val::Str(Rc::from(pid)))));
                }
                b'q' => {
                    let i = self.u8()? as usize;
                    self.put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.put(i)?;
                }
                0x94 => {
                    let i = self.memo.len();
                    self.put(i)?;
                }
                b'p' => {
                    let i = self.line()?.parse().map_err(|_| self.bad("bad PUT index"))?;
                    self.put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as usize;
                    self.get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.get(i)?;
                }
                b'g' => {
                    let i = self.line()?.parse().map_err(|_| self.bad("bad GET index"))?;
                    self.get(i)?;
                }
                other => return Err(PickleError::Opcode { opcode: other, offset: at }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW: Allow = Allow { pairs: &[("collections", "OrderedDict")], label: "test" };

    #[test]
    fn protocol2_dict_with_list_and_memo() {
        // pickle.dumps({'a': [1, 2], 'b': (None, True, -3, 2.5), 'c': b'xy'}, protocol=2) in Python 3
        // uses _codecs.encode for bytes; this hand-written stream uses SHORT_BINSTRING instead.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend_from_slice(&[0x8c, 1, b'a', b']', b'q', 1, b'(', b'K', 1, b'K', 2, b'e']);
        p.extend_from_slice(&[0x8c, 1, b'b', b'(', b'N', 0x88, b'J']);
        p.extend_from_slice(&(-3i32).to_le_bytes());
        p.push(b'G');
        p.extend_from_slice(&2.5f64.to_be_bytes());
        p.extend_from_slice(&[b't', 0x8c, 1, b'c', b'U', 2, b'x', b'y', b'u', b'.']);
        let o = Pickle::parse(&p, &ALLOW).unwrap().resolve().unwrap();
        assert_eq!(o.get("a"), Some(&Obj::List(vec![Obj::Int(1), Obj::Int(2)])));
        assert_eq!(o.get("b"), Some(&Obj::Tuple(vec![Obj::None, Obj::Bool(true), Obj::Int(-3), Obj::Float(2.5)])));
        assert_eq!(o.get("c").and_then(|c| c.as_text()), Some("xy"));
    }

    #[test]
    fn refuses_unlisted_globals_without_calling_them() {
        let p = b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
        let e = Pickle::parse(p, &ALLOW).err().unwrap();
        assert_eq!(e.to_string(), "refusing pickle global posix.system (only test globals are allowed)");
    }

    #[test]
    fn ordered_dict_is_a_dict_even_after_memo_get() {
        // OrderedDict() memoised, filled, then fetched again by BINGET.
        let p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00kK\x07sh\x01\x86q\x02.";
        let o = Pickle::parse(p, &ALLOW).unwrap().resolve().unwrap();
        let t = o.as_seq().unwrap();
        assert_eq!(t[0].get("k"), Some(&Obj::Int(7)));
        assert_eq!(t[0], t[1]);
    }

    #[test]
    fn truncated_and_bad_opcodes() {
        assert_eq!(Pickle::parse(b"\x80\x02}q", &ALLOW).err().unwrap(), PickleError::Truncated { offset: 4 });
        let e = Pickle::parse(b"\x80\x02\xff", &ALLOW).err().unwrap();
        assert_eq!(e, PickleError::Opcode { opcode: 0xff, offset: 2 });
        assert!(Pickle::parse(b"\x80\x02s.", &ALLOW).is_err());
    }

    #[test]
    fn long_ints() {
        let o = Pickle::parse(b"\x80\x02\x8a\x02\x00\xff\x8a\x00\x86.", &ALLOW).unwrap().resolve().unwrap();
        assert_eq!(o, Obj::Tuple(vec![Obj::Int(-256), Obj::Int(0)]));
    }
}
