//! The core plan: which CPUs run shard executors (connections) and which run inference.

use std::fmt;

/// Which CPU ids run shards and which run inference workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorePlan {
    /// CPU ids with one pinned glommio executor each.
    pub shard_cores: Vec<usize>,
    /// CPU ids with one pinned inference worker thread each.
    pub inference_cores: Vec<usize>,
}

/// A plan that cannot run on this machine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The machine reports no usable core.
    #[error("no CPU cores are available to this process")]
    NoCores,
    /// A configured core is not in the process's CPU set.
    #[error("core {core} is not available (this process may use {available:?})")]
    Unavailable {
        /// The requested core.
        core: usize,
        /// The cores the process may use.
        available: Vec<usize>,
    },
    /// A core is listed twice in one list.
    #[error("core {0} is listed twice")]
    Duplicate(usize),
    /// No shard core.
    #[error("at least one shard core is needed")]
    NoShards,
}

impl CorePlan {
    /// The default plan for the cores this process may use (its affinity mask):
    /// 1 core: shard and inference share it; 2 cores: one each; N cores: N/2 inference
    /// (local ASR/TTS are the heavy part), the rest shards.
    pub fn auto(available: &[usize]) -> Result<CorePlan, PlanError> {
        let mut cores = available.to_vec();
        cores.sort_unstable();
        cores.dedup();
        match cores.len() {
            0 => Err(PlanError::NoCores),
            1 => Ok(CorePlan {
                shard_cores: cores.clone(),
                inference_cores: cores,
            }),
            n => {
                let infer = (n / 2).max(1);
                let (shards, inference) = cores.split_at(n - infer);
                Ok(CorePlan {
                    shard_cores: shards.to_vec(),
                    inference_cores: inference.to_vec(),
                })
            }
        }
    }

    /// A plan from configured lists; an empty list is filled from the automatic plan.
    /// Shards and inference may share a core (useful on tiny machines), but that is logged.
    pub fn from_config(
        shard_cores: &[usize],
        inference_cores: &[usize],
        available: &[usize],
    ) -> Result<CorePlan, PlanError> {
        let auto = CorePlan::auto(available)?;
        let pick = |list: &[usize], fallback: &[usize]| -> Result<Vec<usize>, PlanError> {
            if list.is_empty() {
                return Ok(fallback.to_vec());
            }
            let mut seen = Vec::new();
            for &c in list {
                if !available.contains(&c) {
                    return Err(PlanError::Unavailable {
                        core: c,
                        available: available.to_vec(),
                    });
                }
                if seen.contains(&c) {
                    return Err(PlanError::Duplicate(c));
                }
                seen.push(c);
            }
            Ok(seen)
        };
        let shard_cores = pick(shard_cores, &auto.shard_cores)?;
        let inference_cores = pick(inference_cores, &auto.inference_cores)?;
        if shard_cores.is_empty() {
            return Err(PlanError::NoShards);
        }
        Ok(CorePlan {
            shard_cores,
            inference_cores,
        })
    }

    /// The CPU ids this process may run on, from its affinity mask.
    pub fn available_cores() -> Vec<usize> {
        core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect()
    }

    /// Cores used by both shards and inference.
    pub fn shared_cores(&self) -> Vec<usize> {
        self.shard_cores
            .iter()
            .copied()
            .filter(|c| self.inference_cores.contains(c))
            .collect()
    }
}

impl fmt::Display for CorePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shards on cores {:?}, inference on cores {:?}",
            self.shard_cores, self.inference_cores
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_cores_split_one_shard_one_inference() {
        let p = CorePlan::auto(&[0, 1]).unwrap();
        assert_eq!(p.shard_cores, vec![0]);
        assert_eq!(p.inference_cores, vec![1]);
    }

    #[test]
    fn one_core_is_shared() {
        let p = CorePlan::auto(&[3]).unwrap();
        assert_eq!(p.shard_cores, vec![3]);
        assert_eq!(p.inference_cores, vec![3]);
        assert_eq!(p.shared_cores(), vec![3]);
    }

    #[test]
    fn eight_cores_split_in_half() {
        let p = CorePlan::auto(&[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
        assert_eq!(p.shard_cores, vec![0, 1, 2, 3]);
        assert_eq!(p.inference_cores, vec![4, 5, 6, 7]);
    }

    #[test]
    fn configured_core_outside_mask_is_refused() {
        let err = CorePlan::from_config(&[5], &[], &[0, 1]).unwrap_err();
        assert_eq!(
            err,
            PlanError::Unavailable {
                core: 5,
                available: vec![0, 1]
            }
        );
    }

    #[test]
    fn configured_lists_win_and_empty_lists_fall_back() {
        let p = CorePlan::from_config(&[0, 1], &[], &[0, 1]).unwrap();
        assert_eq!(p.shard_cores, vec![0, 1]);
        assert_eq!(p.inference_cores, vec![1]);
    }

    #[test]
    fn duplicate_core_is_refused() {
        assert_eq!(
            CorePlan::from_config(&[0, 0], &[], &[0, 1]).unwrap_err(),
            PlanError::Duplicate(0)
        );
    }
}
