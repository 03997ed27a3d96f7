//! How a file is cut into multipart-upload parts (pure).
//!
//! Scaleway Object Storage takes 1 to 1000 parts of 5 MB to 5 GB each
//! (reference §7; AWS allows 10,000): the part size grows with the file so
//! that the count never exceeds the limit, and a preferred size (for speed,
//! or forced small by a test) is only a lower bound.

use std::ops::Range;

/// A service's multipart limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_parts: u64,
    /// Every part but the last is at least this long.
    pub min_part: u64,
    pub max_part: u64,
}

/// Scaleway's limits, in the units S3 services enforce (MiB for the minimum,
/// which also satisfies "5 MB").
pub const SCALEWAY: Limits = Limits {
    max_parts: 1000,
    min_part: 5 << 20,
    max_part: 5_000_000_000,
};

/// The part size used unless asked otherwise: large enough that requests
/// are few, small enough that a retried part costs little.
pub const DEFAULT_PART_SIZE: u64 = 64 << 20;

/// Parts are multiples of this (aligned reads; round numbers in logs).
const GRANULE: u64 = 1 << 20;

/// The parts of one upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartPlan {
    pub size: u64,
    pub part_size: u64,
    pub count: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "{size} bytes do not fit in {max_parts} parts of at most {max_part} bytes: \
         the service cannot store an object this large"
    )]
    TooLarge {
        size: u64,
        max_parts: u64,
        max_part: u64,
    },
    #[error("a part size of {asked} bytes is below the service's minimum of {min} bytes")]
    PartTooSmall { asked: u64, min: u64 },
}

impl PartPlan {
    /// The plan for `size` bytes with parts of at least `preferred` bytes.
    pub fn new(size: u64, preferred: u64, limits: Limits) -> Result<PartPlan, PlanError> {
        if preferred < limits.min_part {
            return Err(PlanError::PartTooSmall {
                asked: preferred,
                min: limits.min_part,
            });
        }
        let too_large = PlanError::TooLarge {
            size,
            max_parts: limits.max_parts,
            max_part: limits.max_part,
        };
        // The smallest part size that keeps the count within the limit,
        // rounded up to the granule (but never above the maximum part).
        let needed = size.div_ceil(limits.max_parts);
        let part_size = preferred
            .max(needed.div_ceil(GRANULE) * GRANULE)
            .min(limits.max_part);
        if part_size < needed {
            return Err(too_large);
        }
        let count = size.div_ceil(part_size).max(1);
        if count > limits.max_parts {
            return Err(too_large);
        }
        Ok(PartPlan {
            size,
            part_size,
            count,
        })
    }

    /// The byte range of part `number` (1-based, as S3 numbers parts).
    pub fn range(&self, number: u64) -> Range<u64> {
        let start = (number - 1) * self.part_size;
        start..(start + self.part_size).min(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;
    const TB: u64 = 1_000 * GB;

    fn check(plan: &PartPlan, limits: Limits) {
        assert!(
            plan.count >= 1 && plan.count <= limits.max_parts,
            "{plan:?}"
        );
        assert!(plan.part_size >= limits.min_part && plan.part_size <= limits.max_part);
        // The parts cover the file exactly, in order, without overlap.
        let mut next = 0;
        for n in 1..=plan.count {
            let r = plan.range(n);
            assert_eq!(r.start, next, "{plan:?} part {n}");
            assert!(r.end > r.start || plan.size == 0, "{plan:?} part {n} empty");
            next = r.end;
        }
        assert_eq!(next, plan.size, "{plan:?}");
    }

    #[test]
    fn from_1_gb_to_1_tb_the_count_stays_within_1000() {
        let mut size = GB;
        while size <= TB {
            for preferred in [SCALEWAY.min_part, DEFAULT_PART_SIZE, 512 << 20] {
                let plan = PartPlan::new(size, preferred, SCALEWAY).unwrap();
                check(&plan, SCALEWAY);
                assert!(plan.part_size >= preferred);
            }
            size = size * 3 / 2 + 12_345;
        }
        let tb = PartPlan::new(TB, SCALEWAY.min_part, SCALEWAY).unwrap();
        check(&tb, SCALEWAY);
        assert!(tb.part_size >= GB, "1 TB needs parts of about 1 GB: {tb:?}");
    }

    #[test]
    fn a_forced_small_part_size_grows_instead_of_exceeding_the_count() {
        let size = 3 << 30; // 3 GiB
        let plan = PartPlan::new(size, SCALEWAY.min_part, SCALEWAY).unwrap();
        assert_eq!(plan.part_size, SCALEWAY.min_part);
        assert_eq!(plan.count, 615);
        let tiny_limit = Limits {
            max_parts: 10,
            ..SCALEWAY
        };
        let plan = PartPlan::new(size, SCALEWAY.min_part, tiny_limit).unwrap();
        check(&plan, tiny_limit);
        assert_eq!(plan.count, 10);
    }

    #[test]
    fn small_and_empty_files_are_one_part() {
        for size in [0, 1, 4096, DEFAULT_PART_SIZE] {
            let plan = PartPlan::new(size, DEFAULT_PART_SIZE, SCALEWAY).unwrap();
            assert_eq!(plan.count, 1, "{size}");
            assert_eq!(plan.range(1), 0..size);
        }
        let plan = PartPlan::new(DEFAULT_PART_SIZE + 1, DEFAULT_PART_SIZE, SCALEWAY).unwrap();
        assert_eq!(plan.count, 2);
        assert_eq!(plan.range(2), DEFAULT_PART_SIZE..DEFAULT_PART_SIZE + 1);
    }

    #[test]
    fn impossible_plans_say_why() {
        assert_eq!(
            PartPlan::new(1 << 30, 1 << 20, SCALEWAY),
            Err(PlanError::PartTooSmall {
                asked: 1 << 20,
                min: SCALEWAY.min_part
            })
        );
        let too_big = 1000 * SCALEWAY.max_part + 1;
        assert!(matches!(
            PartPlan::new(too_big, DEFAULT_PART_SIZE, SCALEWAY),
            Err(PlanError::TooLarge { .. })
        ));
        let exactly = PartPlan::new(1000 * SCALEWAY.max_part, DEFAULT_PART_SIZE, SCALEWAY).unwrap();
        check(&exactly, SCALEWAY);
    }
}
