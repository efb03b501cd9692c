//! Dependency groups: the slices of tensors that must be removed together when one output
//! channel (a conv filter, a Linear neuron) goes. Removing channel c of a conv removes slice c
//! of its bias, of the BatchNorm after it, and input slice c of every layer that reads it;
//! channels joined by a residual Add are one channel; a Concat shifts them by its offset and a
//! Flatten widens each into H·W inputs of the next Linear (Torch-Pruning's DepGraph, for the
//! operations of prunescope's graph).
//!
//! Channels that reach something whose meaning depends on all of them (the model's output, a
//! LayerNorm or Softmax over them, a MatMul, a Reshape, a grouped convolution) are not
//! prunable, and say why.

use std::collections::HashMap;

use serde::Serialize;

use super::{Graph, GraphError, Op, ParamShape};

/// One tensor's slice in a group: along `axis`, channel c of the group is the `per_channel`
/// entries starting at `offset + c · per_channel`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    pub tensor: String,
    pub axis: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: usize,
    #[serde(skip_serializing_if = "is_one")]
    pub per_channel: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
fn is_one(n: &usize) -> bool {
    *n == 1
}

/// Channels that are removed together, and every tensor slice each one owns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Group {
    pub channels: usize,
    pub members: Vec<Member>,
    /// For attention heads: the features of one head (each member slices `head_dim` entries
    /// per head). `None` for neurons and channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
}

/// Channels that cannot be removed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Blocked {
    /// The tensors that make these channels (a layer's weight and bias).
    pub tensors: Vec<String>,
    pub channels: usize,
    pub why: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Groups {
    pub groups: Vec<Group>,
    pub blocked: Vec<Blocked>,
}

impl Groups {
    /// The groups that slice tensor `name` (a layer's own channels, and its inputs').
    pub fn containing<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Group> + 'a {
        self.groups
            .iter()
            .filter(move |g| g.members.iter().any(|m| m.tensor == name))
    }
}

/// A run of channels along a value's channel axis: from one space, or fixed (`None`: channels
/// nobody can remove, such as the model's inputs).
#[derive(Clone, Copy, Debug)]
struct Seg {
    space: Option<usize>,
    len: usize,
}

/// Where a value keeps its channels: the first per-sample axis (`[C, H, W]`) or the last
/// (`[…, F]`), and how many consecutive entries each channel spans there.
#[derive(Clone, Debug)]
struct Chan {
    segs: Vec<Seg>,
    first_axis: bool,
    per: usize,
}

#[derive(Default)]
struct Space {
    channels: usize,
    producers: Vec<String>,
    members: Vec<Member>,
    blocked: Option<String>,
}

struct Spaces {
    parent: Vec<usize>,
    spaces: Vec<Space>,
}

impl Spaces {
    fn new_space(&mut self, channels: usize, producers: Vec<String>) -> usize {
        self.parent.push(self.parent.len());
        self.spaces.push(Space {
            channels,
            producers,
            ..Default::default()
        });
        self.parent.len() - 1
    }
    fn root(&mut self, mut s: usize) -> usize {
        while self.parent[s] != s {
            self.parent[s] = self.parent[self.parent[s]];
            s = self.parent[s];
        }
        s
    }
    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.root(a), self.root(b));
        if a == b {
            return;
        }
        let moved = std::mem::take(&mut self.spaces[b]);
        self.parent[b] = a;
        let s = &mut self.spaces[a];
        s.producers.extend(moved.producers);
        s.members.extend(moved.members);
        if s.blocked.is_none() {
            s.blocked = moved.blocked;
        }
    }
    fn block_space(&mut self, s: usize, why: &str) {
        let r = self.root(s);
        self.spaces[r]
            .blocked
            .get_or_insert_with(|| why.to_string());
    }
    fn block(&mut self, chan: Option<&Chan>, why: &str) {
        for seg in chan.map_or(&[][..], |c| &c.segs) {
            if let Some(s) = seg.space {
                self.block_space(s, why);
            }
        }
    }
    /// A new space of `channels` output channels made by `weight` (and `bias`), both sliced
    /// along axis 0: the channels of a Linear's or a convolution's output.
    fn produce(
        &mut self,
        channels: usize,
        weight: &str,
        bias: Option<&str>,
        first_axis: bool,
    ) -> Chan {
        let mut producers = vec![weight.to_string()];
        producers.extend(bias.map(str::to_string));
        let s = self.new_space(channels, producers);
        let c = Chan {
            segs: vec![Seg {
                space: Some(s),
                len: channels,
            }],
            first_axis,
            per: 1,
        };
        self.add_members(&c, weight, 0);
        if let Some(b) = bias {
            self.add_members(&c, b, 0);
        }
        c
    }

    /// Adds `tensor`'s slices along `axis` for every segment of `chan`.
    fn add_members(&mut self, chan: &Chan, tensor: &str, axis: usize) {
        let mut offset = 0;
        for seg in &chan.segs {
            if let Some(s) = seg.space {
                let r = self.root(s);
                self.spaces[r].members.push(Member {
                    tensor: tensor.to_string(),
                    axis,
                    offset,
                    per_channel: chan.per,
                });
            }
            offset += seg.len * chan.per;
        }
    }
}

/// The dependency groups of `graph`, with weight shapes from `param_shape(node, tensor)`.
pub fn dependency_groups(graph: &Graph, param_shape: ParamShape) -> Result<Groups, GraphError> {
    let shapes = graph.infer_all(param_shape)?;
    let mut sp = Spaces {
        parent: Vec::new(),
        spaces: Vec::new(),
    };
    let mut chans: HashMap<&str, Option<Chan>> = HashMap::new();
    for i in &graph.inputs {
        chans.insert(&i.name, None);
    }
    for n in &graph.nodes {
        let input = |k: usize| chans.get(n.inputs[k].as_str()).cloned().flatten();
        let rank = |k: usize| shapes.get(n.inputs[k].as_str()).map_or(0, Vec::len);
        let x = input(0);
        let x_rank = rank(0);
        let why = |verb: &str| format!("{} '{}' {verb}", n.op.label(), n.name);
        // A value whose channels sit on its last axis (or whose only axis it is).
        let on_last = |c: &Chan| !c.first_axis || x_rank == 1;
        let out: Option<Chan> = match &n.op {
            Op::Linear { weight, bias } => {
                match &x {
                    Some(c) if on_last(c) => sp.add_members(c, weight, 1),
                    Some(_) => sp.block(x.as_ref(), &why("reads them along another axis")),
                    None => {}
                }
                let w = param_shape(&n.name, weight)?;
                Some(sp.produce(w[0], weight, bias.as_deref(), false))
            }
            Op::Conv2d {
                weight,
                bias,
                groups,
                ..
            } => {
                match &x {
                    Some(c) if *groups == 1 && c.first_axis => sp.add_members(c, weight, 1),
                    Some(_) if *groups == 1 => {
                        sp.block(x.as_ref(), &why("reads them along another axis"))
                    }
                    _ => sp.block(x.as_ref(), &why("is grouped and reads them")),
                }
                let w = param_shape(&n.name, weight)?;
                let c = sp.produce(w[0], weight, bias.as_deref(), true);
                if *groups != 1 {
                    sp.block(Some(&c), &why("is grouped and makes them"));
                }
                Some(c)
            }
            // BatchNorm normalises along a sample's first axis.
            Op::BatchNorm { .. } => match &x {
                Some(c) if c.first_axis || x_rank == 1 => {
                    for (_, t) in n.op.params() {
                        sp.add_members(c, t, 0);
                    }
                    x
                }
                Some(_) => {
                    sp.block(x.as_ref(), &why("normalises along another axis"));
                    None
                }
                None => None,
            },
            Op::LayerNorm { .. } | Op::Softmax => match &x {
                Some(c) if on_last(c) => {
                    sp.block(x.as_ref(), &why("normalises over them"));
                    None
                }
                _ => x,
            },
            Op::Relu
            | Op::Gelu
            | Op::Tanh
            | Op::Sigmoid
            | Op::Dropout { .. }
            | Op::MaxPool { .. }
            | Op::AvgPool { .. } => x,
            Op::GlobalAvgPool { keep_dims } => x.map(|c| Chan {
                first_axis: *keep_dims,
                ..c
            }),
            Op::Flatten => match x {
                Some(c) if c.first_axis && x_rank > 1 => {
                    let spatial: usize = shapes[n.inputs[0].as_str()][1..].iter().product();
                    Some(Chan {
                        segs: c.segs,
                        first_axis: false,
                        per: c.per * spatial,
                    })
                }
                Some(c) if x_rank <= 1 => Some(c),
                other => {
                    sp.block(other.as_ref(), &why("interleaves them with other axes"));
                    None
                }
            },
            Op::Reshape { .. } => {
                sp.block(x.as_ref(), &why("rearranges them"));
                None
            }
            Op::MatMul => {
                sp.block(x.as_ref(), &why("multiplies them"));
                sp.block(input(1).as_ref(), &why("multiplies them"));
                None
            }
            Op::Add => {
                let y = input(1);
                match (&x, &y) {
                    (Some(a), Some(b))
                        if a.first_axis == b.first_axis
                            && a.per == b.per
                            && a.segs.len() == b.segs.len()
                            && a.segs.iter().zip(&b.segs).all(|(p, q)| p.len == q.len) =>
                    {
                        let mut segs = Vec::new();
                        for (p, q) in a.segs.iter().zip(&b.segs) {
                            let space = match (p.space, q.space) {
                                (Some(s), Some(t)) => {
                                    sp.union(s, t);
                                    Some(s)
                                }
                                // Added to channels nobody can remove: neither can these.
                                (Some(s), None) | (None, Some(s)) => {
                                    sp.block_space(
                                        s,
                                        &why("adds them to channels that cannot be removed"),
                                    );
                                    None
                                }
                                (None, None) => None,
                            };
                            segs.push(Seg { space, len: p.len });
                        }
                        Some(Chan { segs, ..a.clone() })
                    }
                    (None, None) => None,
                    (Some(_), None) | (None, Some(_)) => {
                        let w = why("adds them to channels that cannot be removed");
                        sp.block(x.as_ref(), &w);
                        sp.block(y.as_ref(), &w);
                        None
                    }
                    _ => {
                        let w = why("adds them to channels laid out differently");
                        sp.block(x.as_ref(), &w);
                        sp.block(y.as_ref(), &w);
                        None
                    }
                }
            }
            Op::Concat { axis } => {
                let parts: Vec<(Option<Chan>, usize)> =
                    (0..n.inputs.len()).map(|k| (input(k), rank(k))).collect();
                let channel_axis = |c: &Chan, r: usize| if c.first_axis { 0 } else { r - 1 };
                let along_channels = parts
                    .iter()
                    .all(|(c, r)| c.as_ref().is_none_or(|c| channel_axis(c, *r) == *axis));
                let first = parts.iter().find_map(|(c, _)| c.clone());
                match first {
                    Some(f) if along_channels => {
                        let mut segs = Vec::new();
                        let mut ok = true;
                        for (k, (c, _)) in parts.iter().enumerate() {
                            match c {
                                Some(c) if c.per == f.per && c.first_axis == f.first_axis => {
                                    segs.extend(c.segs.iter().copied())
                                }
                                Some(_) => ok = false,
                                None => {
                                    let s = &shapes[n.inputs[k].as_str()];
                                    // A fixed part that is not whole channels would shift every
                                    // later channel by a fraction: none of them can be tracked.
                                    if s[*axis] % f.per.max(1) != 0 {
                                        ok = false;
                                    }
                                    segs.push(Seg {
                                        space: None,
                                        len: s[*axis] / f.per.max(1),
                                    });
                                }
                            }
                        }
                        if ok {
                            Some(Chan { segs, ..f })
                        } else {
                            for (c, _) in &parts {
                                sp.block(
                                    c.as_ref(),
                                    &why("joins them with channels laid out differently"),
                                );
                            }
                            None
                        }
                    }
                    _ => {
                        for (c, _) in &parts {
                            sp.block(c.as_ref(), &why("joins them along another axis"));
                        }
                        None
                    }
                }
            }
        };
        chans.insert(&n.output, out);
    }
    let out = chans.get(graph.output.as_str()).cloned().flatten();
    sp.block(out.as_ref(), "they are the model's output");
    // A tensor read by two nodes (exporters share equal initialisers) ties the channels of
    // every space that slices it the same way; sliced in different ways, none can go.
    let mut slicers: HashMap<(String, usize, usize, usize), usize> = HashMap::new();
    for s in 0..sp.spaces.len() {
        if sp.root(s) != s {
            continue;
        }
        for m in sp.spaces[s].members.clone() {
            let key = (m.tensor.clone(), m.axis, m.offset, m.per_channel);
            let earlier = slicers.get(&key).map(|&t| sp.root(t));
            match earlier {
                Some(t) if sp.spaces[t].channels == sp.spaces[s].channels => sp.union(t, s),
                Some(t) => {
                    let why = format!("'{}' is shared with channels of another size", m.tensor);
                    sp.block_space(t, &why);
                    sp.block_space(s, &why);
                }
                None => {
                    slicers.insert(key, s);
                }
            }
        }
    }
    let mut result = Groups::default();
    for s in 0..sp.spaces.len() {
        if sp.root(s) != s || sp.spaces[s].producers.is_empty() {
            continue;
        }
        let space = &mut sp.spaces[s];
        // The same slice listed twice (a shared tensor) is one member.
        let mut seen = std::collections::HashSet::new();
        space
            .members
            .retain(|m| seen.insert((m.tensor.clone(), m.axis, m.offset, m.per_channel)));
        match &space.blocked {
            Some(why) => result.blocked.push(Blocked {
                tensors: space.producers.clone(),
                channels: space.channels,
                why: why.clone(),
            }),
            None => result.groups.push(Group {
                channels: space.channels,
                members: space.members.clone(),
                head_dim: None,
            }),
        }
    }
    Ok(result)
}
