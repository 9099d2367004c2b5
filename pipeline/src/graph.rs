//! The pipeline DAG.
//!
//! Edge direction: **producer → consumer**. An edge `a → b` carries the [`InputRef`] of `b` that
//! reads an output of `a`, so the edge weight names both the slot and the producer's output.
//!
//! A [`Pipeline`] is validated once, when it is built, and is immutable afterwards: every input
//! names an existing stage and an output that stage declares, names and slots are unique, and
//! there is no cycle. Planning, execution and rendering can therefore index freely without
//! re-checking. Node weights are the stages themselves (`Arc<dyn Stage>`); their declared inputs
//! and outputs are cached in side tables because the trait methods allocate on every call.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use crate::stage::{InputRef, Stage};

/// Why a set of stages does not form a valid pipeline. Each message is one line that names the
/// stages involved and says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GraphError {
    #[error("two stages are named `{name}`; stage names must be unique, rename one of them")]
    DuplicateStage { name: String },
    #[error("stage `{stage}` declares input slot `{slot}` twice; give each input its own slot name")]
    DuplicateSlot { stage: String, slot: String },
    #[error("stage `{stage}` declares output `{output}` twice; output names must be unique per stage")]
    DuplicateOutput { stage: String, output: String },
    #[error("stage `{stage}` input `{slot}` reads from stage `{missing}`, which is not in the pipeline; add it or fix the name")]
    MissingStage { stage: String, slot: String, missing: String },
    #[error(
        "stage `{stage}` input `{slot}` reads output `{output}` of stage `{producer}`, which declares only [{}]; fix the output name",
        declared.join(", ")
    )]
    MissingOutput { stage: String, slot: String, producer: String, output: String, declared: Vec<String> },
    #[error("the pipeline has a cycle: {}; break it by removing one of these inputs", cycle.join(" → "))]
    Cycle {
        /// The stages along the cycle, the first repeated at the end (`a → b → a`).
        cycle: Vec<String>,
    },
    #[error("no stage named `{name}` in the pipeline; `wdro dag` lists the stage names")]
    UnknownStage { name: String },
}

/// A validated, immutable DAG of stages.
pub struct Pipeline {
    graph: DiGraph<Arc<dyn Stage>, InputRef>,
    by_name: BTreeMap<String, NodeIndex>,
    /// Topological order, ties broken by stage name, so plans, runs and drawings are stable.
    topo: Vec<NodeIndex>,
    /// Side tables indexed by `NodeIndex::index()`.
    inputs: Vec<Vec<InputRef>>,
    outputs: Vec<Vec<String>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("stages", &self.names()).finish()
    }
}

impl Pipeline {
    /// Builds and validates the DAG. Checks run in a fixed order (names, declarations, wiring,
    /// cycles) and the first problem found is reported.
    pub fn new(stages: Vec<Arc<dyn Stage>>) -> Result<Pipeline, GraphError> {
        let mut graph: DiGraph<Arc<dyn Stage>, InputRef> = DiGraph::with_capacity(stages.len(), stages.len());
        let mut by_name = BTreeMap::new();
        let mut inputs = Vec::with_capacity(stages.len());
        let mut outputs = Vec::with_capacity(stages.len());
        for stage in stages {
            let name = stage.name().to_string();
            if by_name.contains_key(&name) {
                return Err(GraphError::DuplicateStage { name });
            }
            let ins = stage.inputs();
            let mut slots = BTreeSet::new();
            for i in &ins {
                if !slots.insert(i.slot.as_str()) {
                    return Err(GraphError::DuplicateSlot { stage: name, slot: i.slot.clone() });
                }
            }
            let outs = stage.outputs();
            let mut seen = BTreeSet::new();
            for o in &outs {
                if !seen.insert(o.as_str()) {
                    return Err(GraphError::DuplicateOutput { stage: name, output: o.clone() });
                }
            }
            let idx = graph.add_node(stage);
            by_name.insert(name, idx);
            inputs.push(ins);
            outputs.push(outs);
        }
        // Wire edges, visiting consumers by name so the first reported error is deterministic.
        for (name, &consumer) in &by_name {
            for input in &inputs[consumer.index()] {
                let Some(&producer) = by_name.get(&input.stage) else {
                    return Err(GraphError::MissingStage {
                        stage: name.clone(),
                        slot: input.slot.clone(),
                        missing: input.stage.clone(),
                    });
                };
                let declared = &outputs[producer.index()];
                if !declared.contains(&input.output) {
                    return Err(GraphError::MissingOutput {
                        stage: name.clone(),
                        slot: input.slot.clone(),
                        producer: input.stage.clone(),
                        output: input.output.clone(),
                        declared: declared.clone(),
                    });
                }
                graph.add_edge(producer, consumer, input.clone());
            }
        }
        let mut p = Pipeline { graph, by_name, topo: Vec::new(), inputs, outputs };
        p.topo = p.topological_order()?;
        Ok(p)
    }

    /// Kahn's algorithm with a name-ordered ready set; on leftovers, reports one concrete cycle.
    fn topological_order(&self) -> Result<Vec<NodeIndex>, GraphError> {
        let n = self.graph.node_count();
        let mut indeg: Vec<usize> = vec![0; n];
        for e in self.graph.edge_indices() {
            let (_, b) = self.graph.edge_endpoints(e).expect("edge index is valid");
            indeg[b.index()] += 1;
        }
        let mut ready: BTreeSet<(&str, NodeIndex)> =
            self.graph.node_indices().filter(|i| indeg[i.index()] == 0).map(|i| (self.graph[i].name(), i)).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(first) = ready.pop_first() {
            let i = first.1;
            order.push(i);
            for e in self.graph.edges_directed(i, Direction::Outgoing) {
                use petgraph::visit::EdgeRef;
                let t = e.target();
                indeg[t.index()] -= 1;
                if indeg[t.index()] == 0 {
                    ready.insert((self.graph[t].name(), t));
                }
            }
        }
        if order.len() == n {
            return Ok(order);
        }
        Err(GraphError::Cycle { cycle: self.find_cycle(&indeg) })
    }

    /// A shortest cycle through the alphabetically first stage left over by Kahn's algorithm.
    /// Leftover stages either lie on a cycle or downstream of one; the search starts from a
    /// stage on a cycle (found with Tarjan's SCCs) so the names printed are exactly the loop.
    fn find_cycle(&self, indeg: &[usize]) -> Vec<String> {
        let left: BTreeSet<NodeIndex> = self.graph.node_indices().filter(|i| indeg[i.index()] > 0).collect();
        let on_cycle = |scc: &Vec<NodeIndex>| {
            scc.len() > 1 || self.graph.neighbors_directed(scc[0], Direction::Outgoing).any(|t| t == scc[0])
        };
        let scc = petgraph::algo::tarjan_scc(&self.graph)
            .into_iter()
            .filter(|c| c.iter().all(|i| left.contains(i)) && on_cycle(c))
            .min_by_key(|c| c.iter().map(|&i| self.graph[i].name().to_string()).min())
            .expect("Kahn's algorithm left nodes, so some strongly connected component is a cycle");
        let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
        let start = *scc.iter().min_by_key(|&&i| self.graph[i].name()).expect("non-empty component");
        // BFS inside the component from `start` back to `start`.
        let mut prev: BTreeMap<NodeIndex, NodeIndex> = BTreeMap::new();
        let mut queue = VecDeque::from([start]);
        let mut last = None;
        'bfs: while let Some(i) = queue.pop_front() {
            let mut next: Vec<NodeIndex> =
                self.graph.neighbors_directed(i, Direction::Outgoing).filter(|t| members.contains(t)).collect();
            next.sort_by_key(|&t| self.graph[t].name());
            for t in next {
                if t == start {
                    last = Some(i);
                    break 'bfs;
                }
                if let std::collections::btree_map::Entry::Vacant(e) = prev.entry(t) {
                    e.insert(i);
                    queue.push_back(t);
                }
            }
        }
        let mut path = vec![start];
        let mut cur = last.expect("a strongly connected component has a path back to its start");
        while cur != start {
            path.push(cur);
            cur = prev[&cur];
        }
        path.push(start);
        let last_pos = path.len() - 1;
        path[1..last_pos].reverse();
        path.into_iter().map(|i| self.graph[i].name().to_string()).collect()
    }

    /// The stage named `name` and every stage it transitively reads from (for `--until`).
    pub fn subgraph_until(&self, name: &str) -> Result<Pipeline, GraphError> {
        self.subgraph_until_all([name])
    }

    /// The named stages and all their ancestors, as a new pipeline (stages are shared, not copied).
    pub fn subgraph_until_all<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<Pipeline, GraphError> {
        let mut keep = BTreeSet::new();
        let mut stack = Vec::new();
        for name in names {
            stack.push(self.index_of(name)?);
        }
        while let Some(i) = stack.pop() {
            if keep.insert(i) {
                stack.extend(self.graph.neighbors_directed(i, Direction::Incoming));
            }
        }
        let stages = self.topo.iter().filter(|i| keep.contains(i)).map(|&i| self.graph[i].clone()).collect();
        Pipeline::new(stages)
    }

    fn index_of(&self, name: &str) -> Result<NodeIndex, GraphError> {
        self.by_name.get(name).copied().ok_or_else(|| GraphError::UnknownStage { name: name.to_string() })
    }

    /// Number of stages.
    pub fn len(&self) -> usize {
        self.topo.len()
    }

    pub fn is_empty(&self) -> bool {
        self.topo.is_empty()
    }

    /// Stages in topological order (ties by name).
    pub fn stages(&self) -> impl Iterator<Item = &Arc<dyn Stage>> + '_ {
        self.topo.iter().map(|&i| &self.graph[i])
    }

    /// Stage names in topological order.
    pub fn names(&self) -> Vec<&str> {
        self.stages().map(|s| s.name()).collect()
    }

    pub fn stage(&self, name: &str) -> Option<&Arc<dyn Stage>> {
        self.by_name.get(name).map(|&i| &self.graph[i])
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The stage's declared inputs (as validated at build time).
    pub fn inputs_of(&self, name: &str) -> Option<&[InputRef]> {
        self.by_name.get(name).map(|i| self.inputs[i.index()].as_slice())
    }

    /// The stage's declared output names.
    pub fn outputs_of(&self, name: &str) -> Option<&[String]> {
        self.by_name.get(name).map(|i| self.outputs[i.index()].as_slice())
    }

    /// Names of the stages this stage reads from, sorted, without duplicates.
    pub fn dependencies(&self, name: &str) -> Vec<&str> {
        self.neighbours(name, Direction::Incoming)
    }

    /// Names of the stages that read from this stage, sorted, without duplicates.
    pub fn dependents(&self, name: &str) -> Vec<&str> {
        self.neighbours(name, Direction::Outgoing)
    }

    fn neighbours(&self, name: &str, dir: Direction) -> Vec<&str> {
        let Some(&i) = self.by_name.get(name) else {
            return Vec::new();
        };
        let set: BTreeSet<&str> = self.graph.neighbors_directed(i, dir).map(|t| self.graph[t].name()).collect();
        set.into_iter().collect()
    }

    /// Every edge as (producer, consumer, input), consumers in topological order, then by slot.
    pub fn edges(&self) -> Vec<(&str, &str, &InputRef)> {
        let mut out = Vec::new();
        for &c in &self.topo {
            let mut ins: Vec<&InputRef> = self.inputs[c.index()].iter().collect();
            ins.sort_by(|a, b| a.slot.cmp(&b.slot));
            for input in ins {
                out.push((input.stage.as_str(), self.graph[c].name(), input));
            }
        }
        out
    }

    /// The underlying petgraph graph (producer → consumer, edge weight = the consumer's input).
    pub fn graph(&self) -> &DiGraph<Arc<dyn Stage>, InputRef> {
        &self.graph
    }

    /// Dense view for schedulers: position in topological order of each stage's producers.
    /// `deps[i]` lists, for stage `i` (topological position), the distinct positions it reads from.
    pub(crate) fn dense_deps(&self) -> Vec<Vec<usize>> {
        let pos: BTreeMap<NodeIndex, usize> = self.topo.iter().enumerate().map(|(p, &i)| (i, p)).collect();
        self.topo
            .iter()
            .map(|&i| {
                let set: BTreeSet<usize> =
                    self.graph.neighbors_directed(i, Direction::Incoming).map(|t| pos[&t]).collect();
                set.into_iter().collect()
            })
            .collect()
    }

    /// Position in topological order of a stage name.
    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        let i = self.by_name.get(name)?;
        self.topo.iter().position(|t| t == i)
    }

    /// Stage, inputs and outputs at a topological position.
    pub(crate) fn at(&self, pos: usize) -> (&Arc<dyn Stage>, &[InputRef], &[String]) {
        let i = self.topo[pos];
        (&self.graph[i], &self.inputs[i.index()], &self.outputs[i.index()])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::exec::testing::FakeStage;

    fn names(p: &Pipeline) -> Vec<String> {
        p.names().into_iter().map(String::from).collect()
    }

    #[test]
    fn topological_order_breaks_ties_by_name() {
        let p = Pipeline::new(vec![
            FakeStage::new("z").input("x", "b", "out").build(),
            FakeStage::new("b").build(),
            FakeStage::new("a").build(),
            FakeStage::new("c").input("x", "a", "out").build(),
        ])
        .unwrap();
        assert_eq!(names(&p), ["a", "b", "c", "z"]);
        assert_eq!(p.dependencies("z"), ["b"]);
        assert_eq!(p.dependents("a"), ["c"]);
    }

    #[test]
    fn cycle_error_names_the_stages_in_order() {
        let err = Pipeline::new(vec![
            FakeStage::new("src").build(),
            FakeStage::new("a").input("x", "c", "out").build(),
            FakeStage::new("b").input("x", "a", "out").build(),
            FakeStage::new("c").input("x", "b", "out").input("y", "src", "out").build(),
            FakeStage::new("after").input("x", "c", "out").build(),
        ])
        .err()
        .unwrap();
        assert_eq!(err, GraphError::Cycle { cycle: vec!["a".into(), "b".into(), "c".into(), "a".into()] });
        assert_eq!(
            err.to_string(),
            "the pipeline has a cycle: a → b → c → a; break it by removing one of these inputs"
        );
    }

    #[test]
    fn self_loop_is_a_cycle() {
        let err = Pipeline::new(vec![FakeStage::new("a").input("x", "a", "out").build()]).err().unwrap();
        assert_eq!(err, GraphError::Cycle { cycle: vec!["a".into(), "a".into()] });
    }

    #[test]
    fn missing_stage_and_output_and_duplicates_are_named() {
        let err = Pipeline::new(vec![FakeStage::new("eval").input("model", "train", "model").build()]).err().unwrap();
        assert_eq!(
            err.to_string(),
            "stage `eval` input `model` reads from stage `train`, which is not in the pipeline; add it or fix the name"
        );
        let err = Pipeline::new(vec![
            FakeStage::new("train").build(),
            FakeStage::new("eval").input("model", "train", "weights").build(),
        ])
        .err()
        .unwrap();
        assert_eq!(
            err.to_string(),
            "stage `eval` input `model` reads output `weights` of stage `train`, which declares only [out]; fix the output name"
        );
        let err = Pipeline::new(vec![FakeStage::new("a").build(), FakeStage::new("a").build()]).err().unwrap();
        assert_eq!(err, GraphError::DuplicateStage { name: "a".into() });
        let err = Pipeline::new(vec![
            FakeStage::new("a").build(),
            FakeStage::new("b").input("x", "a", "out").input("x", "a", "out").build(),
        ])
        .err()
        .unwrap();
        assert_eq!(err, GraphError::DuplicateSlot { stage: "b".into(), slot: "x".into() });
    }

    #[test]
    fn subgraph_until_keeps_ancestors_only() {
        let p = Pipeline::new(vec![
            FakeStage::new("fetch").build(),
            FakeStage::new("train").input("data", "fetch", "out").build(),
            FakeStage::new("eval").input("model", "train", "out").input("data", "fetch", "out").build(),
            FakeStage::new("other").build(),
        ])
        .unwrap();
        let sub = p.subgraph_until("train").unwrap();
        assert_eq!(names(&sub), ["fetch", "train"]);
        assert_eq!(
            p.subgraph_until("nope").err().unwrap().to_string(),
            "no stage named `nope` in the pipeline; `wdro dag` lists the stage names"
        );
        let edges: Vec<_> = p.edges().into_iter().map(|(a, b, i)| format!("{a}->{b}:{}", i.slot)).collect();
        assert_eq!(edges, ["fetch->train:data", "fetch->eval:data", "train->eval:model"]);
    }
}
