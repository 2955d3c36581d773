//! A small deterministic generator for the deciders' seeded random
//! sequences, so that a failing seed replays.

/// xorshift64, seeded.
pub(crate) struct Rng(u64);

impl Rng {
    /// The generator for `seed` (any seed, 0 included).
    pub(crate) fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A number below `n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
