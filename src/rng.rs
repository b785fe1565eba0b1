//! Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11). A draw is a pure
//! function of (seed, counter), so the CPU and a GPU kernel can produce the same numbers for
//! the same (seed, row, step, position) in any order.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds: four 32-bit outputs for a 128-bit counter and 64-bit key.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The uniform draw in [0, 1) used to sample the token of (row, step, position): counter
/// (row, step, position, 0), key = the 64-bit seed; 53 bits from the first two outputs.
pub fn token_uniform(seed: u64, row: u32, step: u32, position: u32) -> f64 {
    let x = philox4x32_10([row, step, position, 0], [seed as u32, (seed >> 32) as u32]);
    let bits = ((x[0] as u64) << 21) | ((x[1] as u64) >> 11);
    bits as f64 * (1.0 / (1u64 << 53) as f64)
}

/// xorshift32 (Marsaglia 2003) for test and benchmark data, not for sampling (that is
/// [`token_uniform`]): cheap, deterministic, any nonzero seed.
#[doc(hidden)]
pub struct XorShift32(pub u32);

impl XorShift32 {
    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    /// `n` values in [-0.5, 0.5].
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| self.next_u32() as f32 / u32::MAX as f32 - 0.5)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer_vectors() {
        // Random123's published known-answer tests for philox4x32_10.
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([!0, !0, !0, !0], [!0, !0]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn uniforms_are_in_range_and_differ() {
        let a = token_uniform(7, 0, 3, 5);
        let b = token_uniform(7, 0, 3, 6);
        let c = token_uniform(8, 0, 3, 5);
        assert!((0.0..1.0).contains(&a) && a != b && a != c);
        assert_eq!(a, token_uniform(7, 0, 3, 5));
    }
}
