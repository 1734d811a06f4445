//! Rank layout (DESIGN.md § Parallelism): world = DP x TP, TP ranks adjacent (inside a node):
//!   tp_rank = rank % tp,  dp_rank = rank / tp.
//! Worked example, 8 ranks as tp 2 x dp 4: TP groups {0,1} {2,3} {4,5} {6,7}; DP groups
//! {0,2,4,6} {1,3,5,7}; rank 5 is tp_rank 1 of TP group {4,5} and dp_rank 2 of DP group {1,3,5,7}.

use deberta_model::DebertaConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub tp: usize,
    pub dp: usize,
}

impl Layout {
    /// Every reason this layout cannot run `cfg` on `world` ranks (empty = fine). All ranks
    /// compute the same list, so they agree on refusing without communicating.
    pub fn problems(&self, world: usize, cfg: Option<&DebertaConfig>) -> Vec<String> {
        let mut p = Vec::new();
        if self.tp == 0 || self.dp == 0 {
            p.push(format!(
                "parallel.tensor ({}) and parallel.data ({}) must be >= 1",
                self.tp, self.dp
            ));
            return p;
        }
        if self.tp > world {
            p.push(format!(
                "parallel.tensor = {} is larger than the {world} rank(s) of the job",
                self.tp
            ));
        }
        if self.tp * self.dp != world {
            p.push(format!(
                "the job has {world} rank(s) but parallel.tensor x parallel.data = {} x {} = {}",
                self.tp,
                self.dp,
                self.tp * self.dp
            ));
        }
        if let Some(c) = cfg {
            let tp = self.tp as i64;
            if c.num_attention_heads % tp != 0 {
                p.push(format!(
                    "parallel.tensor = {} does not divide model.num_attention_heads = {}",
                    self.tp, c.num_attention_heads
                ));
            }
            if c.intermediate_size % tp != 0 {
                p.push(format!(
                    "parallel.tensor = {} does not divide model.intermediate_size = {}",
                    self.tp, c.intermediate_size
                ));
            }
        }
        p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub layout: Layout,
    pub rank: usize,
    pub world_size: usize,
    pub tp_rank: usize,
    pub dp_rank: usize,
}

impl Topology {
    pub fn new(layout: Layout, rank: usize, world_size: usize) -> Topology {
        Topology {
            layout,
            rank,
            world_size,
            tp_rank: rank % layout.tp,
            dp_rank: rank / layout.tp,
        }
    }

    /// World ranks of this rank's TP group, in TP-rank order.
    pub fn tp_group(&self) -> Vec<usize> {
        let first = self.dp_rank * self.layout.tp;
        (first..first + self.layout.tp).collect()
    }

    /// World ranks of this rank's DP group, in DP-rank order.
    pub fn dp_group(&self) -> Vec<usize> {
        (0..self.layout.dp).map(|d| d * self.layout.tp + self.tp_rank).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worked_example() {
        let t = Topology::new(Layout { tp: 2, dp: 4 }, 5, 8);
        assert_eq!((t.tp_rank, t.dp_rank), (1, 2));
        assert_eq!(t.tp_group(), [4, 5]);
        assert_eq!(t.dp_group(), [1, 3, 5, 7]);
    }

    #[test]
    fn problems_are_named() {
        let cfg = DebertaConfig::tiny(); // 4 heads, FFN 128
        assert!(Layout { tp: 2, dp: 2 }.problems(4, Some(&cfg)).is_empty());
        let p = Layout { tp: 3, dp: 1 }.problems(3, Some(&cfg));
        assert!(p.iter().any(|m| m.contains("num_attention_heads = 4")), "{p:?}");
        let p = Layout { tp: 2, dp: 3 }.problems(4, None);
        assert!(p.iter().any(|m| m.contains("2 x 3 = 6")), "{p:?}");
        let p = Layout { tp: 8, dp: 1 }.problems(4, None);
        assert!(p.iter().any(|m| m.contains("larger than the 4 rank")), "{p:?}");
    }
}
