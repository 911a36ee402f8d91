//! The featurizer: text → a fixed-length, L2-normalised vector of hashed n-gram counts.
//!
//! This is the only featurizer in the project. Training (`cargo xtask train-intent`), the edge
//! (tract, WASM) and the batch worker (ONNX Runtime) all call [`Featurizer::featurize_into`], so
//! the model always sees exactly the features it was trained on.
//!
//! Steps:
//! 1. keep at most [`FeaturizerConfig::max_chars`] characters (bounded CPU for any input);
//! 2. Unicode NFKC, then lower-case (English case folding);
//! 3. squash runs of one character longer than two (`안녕~~~~` → `안녕~~`, `hiiii` → `hii`);
//! 4. emit hashed features from several views of the text:
//!    - `w`: whole words (split on whitespace and punctuation);
//!    - `c`: character 1-3-grams with word boundaries;
//!    - `j`: 2-4-grams of the text with Hangul syllables decomposed into jamo, so a typo that
//!      changes one jamo (`감사함니다`) still shares most grams with the right spelling;
//!    - `i`: 2-3-grams of Hangul initial consonants, so chat shorthand (`ㅎㅇ`, `ㄱㅅ`) matches
//!      the words it abbreviates (`하이`, `감사`);
//!    - `l`: coarse length buckets (characters and words), which help to tell a bare greeting
//!      from a greeting followed by a request;
//! 5. value = 1 + ln(count) per bucket, then L2 normalisation.
//!
//! The function is total: any `&str` (empty, huge, emoji, RTL, replacement characters) gives a
//! finite vector of the configured length.

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

/// Featurizer parameters, stored beside the model so that training and inference agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeaturizerConfig {
    /// Version of the feature definition; bump it when the algorithm changes.
    pub version: u32,
    /// Number of hash buckets: the length of the feature vector.
    pub buckets: u32,
    /// Characters of input considered; the rest is ignored.
    pub max_chars: u32,
}

impl Default for FeaturizerConfig {
    fn default() -> Self {
        Self {
            version: FEATURE_VERSION,
            buckets: 4096,
            max_chars: 2048,
        }
    }
}

/// Version of the feature definition implemented by this module.
pub const FEATURE_VERSION: u32 = 1;

/// Errors in a featurizer configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "featurizer version {0} is not supported (this build implements {FEATURE_VERSION}); retrain the model with `cargo xtask train-intent`"
    )]
    Version(u32),
    #[error("featurizer buckets must be between 16 and 1048576, got {0}")]
    Buckets(u32),
    #[error("featurizer max_chars must be between 1 and 1048576, got {0}")]
    MaxChars(u32),
}

/// A validated featurizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Featurizer {
    config: FeaturizerConfig,
}

impl Featurizer {
    /// Validates `config`.
    pub fn new(config: FeaturizerConfig) -> Result<Self, ConfigError> {
        if config.version != FEATURE_VERSION {
            return Err(ConfigError::Version(config.version));
        }
        if !(16..=1 << 20).contains(&config.buckets) {
            return Err(ConfigError::Buckets(config.buckets));
        }
        if !(1..=1 << 20).contains(&config.max_chars) {
            return Err(ConfigError::MaxChars(config.max_chars));
        }
        Ok(Self { config })
    }

    pub fn config(&self) -> FeaturizerConfig {
        self.config
    }

    /// Length of the vectors this featurizer produces.
    pub fn dim(&self) -> usize {
        self.config.buckets as usize
    }

    /// Returns the feature vector of `text`.
    pub fn featurize(&self, text: &str) -> Vec<f32> {
        let mut out = vec![0.0; self.dim()];
        self.featurize_into(text, &mut out);
        out
    }

    /// Writes the feature vector of `text` into `out` (any previous content is overwritten).
    ///
    /// # Panics
    /// If `out.len() != self.dim()`: a programming error, never caused by input text.
    pub fn featurize_into(&self, text: &str, out: &mut [f32]) {
        assert_eq!(out.len(), self.dim(), "feature buffer has the wrong length");
        out.fill(0.0);
        // The working buffers live per thread and keep their capacity, so a message costs no
        // allocation once a thread has seen one as long.
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut s) => self.featurize_with(text, out, &mut s),
            // Only reachable if featurizing re-entered itself on this thread.
            Err(_) => self.featurize_with(text, out, &mut Scratch::default()),
        });
    }

    fn featurize_with(&self, text: &str, out: &mut [f32], s: &mut Scratch) {
        let buckets = self.config.buckets;
        let mask = buckets.is_power_of_two().then(|| buckets - 1);
        // The buckets hit, one bit each, so that the rest of the work visits only them, in
        // bucket order (a short message hits ~100 of 4096).
        let Scratch {
            normalized,
            chars,
            jamo,
            initials,
            touched,
            counts,
            ..
        } = s;
        touched.clear();
        touched.resize((buckets as usize).div_ceil(64), 0);
        // All zero between calls: the pass below resets every bucket it reads.
        if counts.len() < buckets as usize {
            counts.resize(buckets as usize, 0);
        }
        let mut emit = |h: u32| {
            // Not `map_or(h % buckets, …)`: its argument is evaluated, a division per gram.
            let bucket = match mask {
                Some(m) => h & m,
                None => h % buckets,
            } as usize;
            counts[bucket] += 1;
            touched[bucket / 64] |= 1 << (bucket % 64);
        };

        normalize_into(text, self.config.max_chars as usize, normalized);

        let (n_words, n_chars) = split_words(normalized, chars, |family, gram| {
            emit(hash(family, gram));
        });
        hashed_ngrams(chars, b'c', 1, 3, &mut emit);

        jamo.clear();
        initials.clear();
        for &c in chars.iter() {
            decompose(c, jamo, initials);
        }
        hashed_ngrams(jamo, b'j', 2, 4, &mut emit);
        hashed_ngrams(initials, b'i', 2, 3, &mut emit);

        emit(hash(b'l', &[char::from(b'c'), length_bucket(n_chars)]));
        emit(hash(b'l', &[char::from(b'w'), length_bucket(n_words)]));

        // In bucket order, so the sum (and every bit of the result) is that of a dense pass.
        let Scratch {
            touched,
            counts,
            hits,
            log_table,
            ..
        } = s;
        if log_table.is_empty() {
            // `1 + ln(count)` for the small counts nearly every bucket has, computed by the
            // same `ln` as the fallback below, so the table changes no bit.
            log_table.extend((0..LOG_TABLE).map(|n| 1.0 + (n as f32).ln()));
        }
        hits.clear();
        let mut norm = 0.0f32;
        for (i, &word) in touched.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let b = i * 64 + rest.trailing_zeros() as usize;
                rest &= rest - 1;
                let count = std::mem::take(&mut counts[b]);
                // As an `f32` the count is exact (far below 2^24: at most ~16 grams per
                // character of at most 2^20), as the first version's float counters were.
                let v = log_table
                    .get(count as usize)
                    .copied()
                    .unwrap_or_else(|| 1.0 + (count as f32).ln());
                norm += v * v;
                hits.push((b as u32, v));
            }
        }
        let inv = if norm > 0.0 { norm.sqrt().recip() } else { 1.0 };
        for &(b, v) in hits.iter() {
            out[b as usize] = v * inv;
        }
    }
}

/// Counts below this have `1 + ln(count)` precomputed.
const LOG_TABLE: usize = 64;

/// A thread's reusable working buffers for [`Featurizer::featurize_into`].
#[derive(Default)]
struct Scratch {
    normalized: String,
    chars: Vec<char>,
    jamo: Vec<char>,
    initials: Vec<char>,
    touched: Vec<u64>,
    /// Grams per bucket; all zero between calls.
    counts: Vec<u32>,
    /// The buckets hit and their `1 + ln(count)`, in bucket order.
    hits: Vec<(u32, f32)>,
    log_table: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

const BOUNDARY: char = '_';

/// Words (split on whitespace and punctuation) and the character stream with one `_` between
/// words and at both ends, into `chars` (cleared first). Each word is emitted as a `w` gram, and
/// each punctuation mark or emoji as a `p` gram of its own: they carry signal too (`?` vs `!`,
/// 👋 vs 🙏). Returns (words, characters in words).
fn split_words(
    normalized: &str,
    chars: &mut Vec<char>,
    mut emit: impl FnMut(u8, &[char]),
) -> (u32, u32) {
    chars.clear();
    chars.push(BOUNDARY);
    let (mut n_words, mut n_chars) = (0u32, 0u32);
    let mut word_start = None;
    for c in normalized.chars().chain(std::iter::once(' ')) {
        if is_word_char(c) {
            word_start.get_or_insert(chars.len());
            chars.push(c);
            continue;
        }
        if let Some(start) = word_start.take() {
            emit(b'w', &chars[start..]);
            n_words += 1;
            n_chars += (chars.len() - start) as u32;
            chars.push(BOUNDARY);
        }
        if !c.is_whitespace() {
            emit(b'p', &[c]);
        }
    }
    (n_words, n_chars)
}

/// NFKC, lower case, at most `max_chars` input characters, runs longer than two squashed.
pub fn normalize(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 4));
    normalize_into(text, max_chars, &mut out);
    out
}

/// [`normalize`] into `out` (cleared first).
fn normalize_into(text: &str, max_chars: usize, out: &mut String) {
    use unicode_normalization::{IsNormalized, is_nfkc_quick};
    out.clear();
    let (mut last, mut run) = ('\0', 0usize);
    let mut push = |c: char| {
        if c == last {
            run += 1;
            if run > 2 {
                return;
            }
        } else {
            (last, run) = (c, 1);
        }
        out.push(c);
    };
    let mut lower = |c: char| {
        // Hangul syllables have no case; skip their table lookup.
        if c.is_ascii() || is_hangul_syllable(c) {
            push(c.to_ascii_lowercase());
        } else {
            c.to_lowercase().for_each(&mut push);
        }
    };
    let head = || text.chars().take(max_chars);
    // Most messages (ASCII, precomposed Hangul) are already NFKC: skip the decomposition.
    // Both are NFKC and compose only with a following combining mark or conjoining jamo, so
    // text made of them alone is NFKC without a table lookup.
    if head().all(|c| c.is_ascii() || is_hangul_syllable(c))
        || is_nfkc_quick(head()) == IsNormalized::Yes
    {
        head().for_each(&mut lower);
    } else {
        head().nfkc().for_each(&mut lower);
    }
}

fn is_hangul_syllable(c: char) -> bool {
    ('\u{AC00}'..='\u{D7A3}').contains(&c)
}

fn is_word_char(c: char) -> bool {
    // Hangul syllables and jamo first: they are most of the text and `is_alphanumeric` looks
    // them up in a table.
    is_hangul_syllable(c) || is_jamo(c) || c.is_alphanumeric()
}

fn is_jamo(c: char) -> bool {
    matches!(c, '\u{1100}'..='\u{11FF}' | '\u{3131}'..='\u{318E}' | '\u{A960}'..='\u{A97F}' | '\u{D7B0}'..='\u{D7FF}')
}

/// Emits the hash of every `min..=max`-gram of `s` under `family`, except grams made only of
/// boundaries (they say nothing). The grams starting at one position share their prefix, and
/// FNV-1a is computed left to right, so each position hashes its longest gram once and emits
/// the shorter ones on the way: `hash(family, gram)` for each, in another order than gram
/// length by gram length, which the counts do not see.
fn hashed_ngrams(s: &[char], family: u8, min: usize, max: usize, emit: &mut impl FnMut(u32)) {
    for start in 0..s.len() {
        let mut h = fnv_start(family);
        let mut informative = false;
        for (len, &c) in (1..=max).zip(&s[start..]) {
            h = fnv_char(h, c);
            informative |= c != BOUNDARY;
            if len >= min && informative {
                emit(h);
            }
        }
    }
}

const S_BASE: u32 = 0xAC00;
const L_BASE: u32 = 0x1100;
const V_BASE: u32 = 0x1161;
const T_BASE: u32 = 0x11A7;
const V_COUNT: u32 = 21;
const T_COUNT: u32 = 28;
const N_COUNT: u32 = V_COUNT * T_COUNT;
const S_COUNT: u32 = 19 * N_COUNT;

/// Appends the jamo of `c` to `jamo` and its initial consonants to `initials`.
///
/// After NFKC, a lone consonant typed as shorthand (`ㅎ`, U+314E) is the conjoining initial
/// (U+1112), except the clusters that can only end a syllable (`ㄳ` → U+11AA): those are split
/// into the initials they abbreviate, so `ㄳ` reads like `ㄱㅅ`.
fn decompose(c: char, jamo: &mut Vec<char>, initials: &mut Vec<char>) {
    let u = c as u32;
    if (S_BASE..S_BASE + S_COUNT).contains(&u) {
        let s = u - S_BASE;
        let (l, v, t) = (s / N_COUNT, (s % N_COUNT) / T_COUNT, s % T_COUNT);
        let lead = char_from(L_BASE + l);
        jamo.push(lead);
        jamo.push(char_from(V_BASE + v));
        if t != 0 {
            jamo.push(char_from(T_BASE + t));
        }
        initials.push(lead);
    } else if ('\u{1100}'..='\u{1112}').contains(&c) {
        jamo.push(c);
        initials.push(c);
    } else if let Some(parts) = final_as_initials(c) {
        jamo.push(c);
        initials.extend_from_slice(parts);
    } else {
        jamo.push(c);
        if c == BOUNDARY {
            initials.push(c);
        }
    }
}

fn char_from(u: u32) -> char {
    char::from_u32(u).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// Final consonants (clusters included) as the initials a shorthand writer meant.
fn final_as_initials(c: char) -> Option<&'static [char]> {
    Some(match c {
        '\u{11A8}' => &['\u{1100}'],
        '\u{11AA}' => &['\u{1100}', '\u{1109}'],
        '\u{11AB}' => &['\u{1102}'],
        '\u{11AC}' => &['\u{1102}', '\u{110C}'],
        '\u{11AD}' => &['\u{1102}', '\u{1112}'],
        '\u{11AE}' => &['\u{1103}'],
        '\u{11AF}' => &['\u{1105}'],
        '\u{11B0}' => &['\u{1105}', '\u{1100}'],
        '\u{11B1}' => &['\u{1105}', '\u{1106}'],
        '\u{11B2}' => &['\u{1105}', '\u{1107}'],
        '\u{11B3}' => &['\u{1105}', '\u{1109}'],
        '\u{11B4}' => &['\u{1105}', '\u{1110}'],
        '\u{11B5}' => &['\u{1105}', '\u{1111}'],
        '\u{11B6}' => &['\u{1105}', '\u{1112}'],
        '\u{11B7}' => &['\u{1106}'],
        '\u{11B8}' => &['\u{1107}'],
        '\u{11B9}' => &['\u{1107}', '\u{1109}'],
        '\u{11BA}' => &['\u{1109}'],
        '\u{11BC}' => &['\u{110B}'],
        '\u{11BD}' => &['\u{110C}'],
        '\u{11BE}' => &['\u{110E}'],
        '\u{11BF}' => &['\u{110F}'],
        '\u{11C0}' => &['\u{1110}'],
        '\u{11C1}' => &['\u{1111}'],
        '\u{11C2}' => &['\u{1112}'],
        _ => return None,
    })
}

fn length_bucket(n: u32) -> char {
    match n {
        0 => 'a',
        1 => 'b',
        2 => 'c',
        3 => 'd',
        4..=5 => 'e',
        6..=8 => 'f',
        9..=12 => 'g',
        13..=20 => 'h',
        21..=40 => 'i',
        _ => 'j',
    }
}

/// FNV-1a over the family tag and the code points (each as 4 little-endian bytes): stable
/// across platforms and releases.
fn hash(family: u8, gram: &[char]) -> u32 {
    gram.iter().fold(fnv_start(family), |h, &c| fnv_char(h, c))
}

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

fn fnv_start(family: u8) -> u32 {
    (FNV_OFFSET ^ u32::from(family)).wrapping_mul(FNV_PRIME)
}

/// `FNV_PRIME` to the third power (wrapping).
const FNV_PRIME_3: u32 = FNV_PRIME.wrapping_mul(FNV_PRIME).wrapping_mul(FNV_PRIME);

fn fnv_char(mut h: u32, c: char) -> u32 {
    let u = c as u32;
    if u < 0x1_0000 {
        // A BMP code point's two high bytes are zero, and a zero byte only multiplies
        // (`h ^ 0 = h`); wrapping multiplication is associative, so the second byte's step and
        // theirs are one multiplication by the prime's cube: two in all instead of four, same
        // bits.
        return ((h ^ (u & 0xff)).wrapping_mul(FNV_PRIME) ^ (u >> 8)).wrapping_mul(FNV_PRIME_3);
    }
    for b in u.to_le_bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(FNV_PRIME);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn f() -> Featurizer {
        Featurizer::new(FeaturizerConfig::default()).expect("default config is valid")
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// The featurizer as first written (one hash per gram from scratch, fresh buffers, `%`,
    /// `ln` per bucket, dense passes): the optimised [`Featurizer::featurize_into`] must give
    /// the same bits. It shares normalisation, word splitting and jamo decomposition, which
    /// the optimisation left as they were.
    fn reference(fz: &Featurizer, text: &str) -> Vec<f32> {
        fn ngrams(s: &[char], min: usize, max: usize, mut f: impl FnMut(&[char])) {
            for n in min..=max {
                for gram in s.windows(n) {
                    if gram.iter().any(|&c| c != BOUNDARY) {
                        f(gram);
                    }
                }
            }
        }
        fn fnv(family: u8, gram: &[char]) -> u32 {
            let mut h: u32 = 0x811c_9dc5;
            let mut feed = |b: u8| {
                h ^= u32::from(b);
                h = h.wrapping_mul(0x0100_0193);
            };
            feed(family);
            for &c in gram {
                for b in (c as u32).to_le_bytes() {
                    feed(b);
                }
            }
            h
        }
        let buckets = fz.config.buckets;
        let mut out = vec![0.0f32; fz.dim()];
        let mut emit =
            |family: u8, gram: &[char]| out[(fnv(family, gram) % buckets) as usize] += 1.0;
        let normalized = normalize(text, fz.config.max_chars as usize);
        // Word splitting is shared: the optimisation did not touch it.
        let mut chars = Vec::new();
        let (n_words, n_chars) = split_words(&normalized, &mut chars, &mut emit);
        ngrams(&chars, 1, 3, |g| emit(b'c', g));
        let (mut jamo, mut initials) = (Vec::new(), Vec::new());
        for &c in &chars {
            decompose(c, &mut jamo, &mut initials);
        }
        ngrams(&jamo, 2, 4, |g| emit(b'j', g));
        ngrams(&initials, 2, 3, |g| emit(b'i', g));
        emit(b'l', &[char::from(b'c'), length_bucket(n_chars)]);
        emit(b'l', &[char::from(b'w'), length_bucket(n_words)]);
        let mut norm = 0.0f32;
        for v in out.iter_mut().filter(|v| **v > 0.0) {
            *v = 1.0 + v.ln();
            norm += *v * *v;
        }
        if norm > 0.0 {
            let inv = norm.sqrt().recip();
            out.iter_mut().for_each(|v| *v *= inv);
        }
        out
    }

    #[test]
    fn every_committed_intent_line_featurizes_as_the_reference_does() {
        let fz = f();
        // Also a bucket count that is not a power of two (the `%` path).
        let odd = Featurizer::new(FeaturizerConfig {
            buckets: 3000,
            ..FeaturizerConfig::default()
        })
        .expect("valid config");
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/intent/data");
        let mut lines = 0;
        for split in ["train", "dev", "test"] {
            let text = std::fs::read_to_string(data.join(format!("{split}.jsonl")))
                .expect("the intent data is committed");
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).expect("valid JSON line");
                let t = v["text"].as_str().expect("a text field");
                assert_eq!(fz.featurize(t), reference(&fz, t), "{t:?}");
                if lines % 7 == 0 {
                    assert_eq!(
                        odd.featurize(t),
                        reference(&odd, t),
                        "{t:?} at 3000 buckets"
                    );
                }
                lines += 1;
            }
        }
        assert!(lines > 30_000, "{lines} lines");
    }

    #[test]
    fn empty_text_gives_a_finite_vector() {
        let v = f().featurize("");
        assert_eq!(v.len(), 4096);
        assert!(v.iter().all(|x| x.is_finite()));
        // Only the length features fire.
        assert!(v.iter().filter(|x| **x > 0.0).count() <= 2);
    }

    #[test]
    fn shorthand_shares_initials_with_the_word_it_abbreviates() {
        let fz = f();
        let short = fz.featurize("ㅎㅇ");
        let hi = fz.featurize("하이");
        let unrelated = fz.featurize("떡볶이");
        assert!(cosine(&short, &hi) > cosine(&short, &unrelated) + 0.1);
        let thanks = fz.featurize("ㄱㅅ");
        let gamsa = fz.featurize("감사");
        assert!(cosine(&thanks, &gamsa) > 0.2, "{}", cosine(&thanks, &gamsa));
    }

    #[test]
    fn single_jamo_cluster_reads_like_its_initials() {
        let fz = f();
        assert!(cosine(&fz.featurize("ㄳ"), &fz.featurize("ㄱㅅ")) > 0.3);
    }

    #[test]
    fn typo_stays_close_to_the_right_spelling() {
        let fz = f();
        let right = fz.featurize("감사합니다");
        let typo = fz.featurize("감사함니다");
        let other = fz.featurize("짜장면 추천");
        assert!(cosine(&right, &typo) > 0.6, "{}", cosine(&right, &typo));
        assert!(cosine(&right, &other) < 0.2);
    }

    #[test]
    fn spacing_errors_stay_close() {
        let fz = f();
        assert!(cosine(&fz.featurize("고맙습니다"), &fz.featurize("고맙 습니다")) > 0.6);
    }

    #[test]
    fn case_and_width_are_folded() {
        let fz = f();
        assert_eq!(fz.featurize("HELLO"), fz.featurize("hello"));
        assert_eq!(fz.featurize("ｈｅｌｌｏ"), fz.featurize("hello"));
    }

    #[test]
    fn long_runs_are_squashed() {
        assert_eq!(normalize("안녕~~~~~~", 100), "안녕~~");
        assert_eq!(normalize("hiiiii", 100), "hii");
    }

    #[test]
    fn mixed_greeting_and_request_differs_from_bare_greeting() {
        let fz = f();
        let bare = fz.featurize("안녕!");
        let mixed = fz.featurize("안녕! 근처 짜장면집 추천해줘");
        assert!(cosine(&bare, &mixed) < 0.5);
    }

    #[test]
    fn code_switching_keeps_both_languages() {
        let fz = f();
        let mixed = fz.featurize("hi 안녕");
        assert!(cosine(&mixed, &fz.featurize("hi")) > 0.2);
        assert!(cosine(&mixed, &fz.featurize("안녕")) > 0.2);
    }

    #[test]
    fn input_past_max_chars_is_ignored() {
        let fz = f();
        let head = "가".repeat(2048);
        assert_eq!(
            fz.featurize(&head),
            fz.featurize(&format!("{head}{}", "x".repeat(10_000)))
        );
    }

    #[test]
    fn one_megabyte_input_is_handled() {
        let v = f().featurize(&"안녕 hello 👋 ".repeat(80_000));
        assert!((v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn bad_config_is_rejected_with_a_reason() {
        let bad = FeaturizerConfig {
            version: 99,
            ..FeaturizerConfig::default()
        };
        assert_eq!(Featurizer::new(bad), Err(ConfigError::Version(99)));
        let bad = FeaturizerConfig {
            buckets: 3,
            ..FeaturizerConfig::default()
        };
        let err = Featurizer::new(bad).expect_err("3 buckets are too few");
        assert!(err.to_string().contains("buckets"));
    }

    /// Hash values are part of the model format: changing them silently breaks every model.
    /// The expected value is FNV-1a computed independently (Python) over the same bytes.
    #[test]
    fn hash_is_stable() {
        assert_eq!(hash(b'w', &['h', 'i']), 0xbc08_35c7);
    }

    proptest! {
        #[test]
        fn featurize_is_total_finite_and_normalised(s in "\\PC*") {
            let v = f().featurize(&s);
            prop_assert_eq!(v.len(), 4096);
            prop_assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0));
            let norm: f32 = v.iter().map(|x| x * x).sum();
            prop_assert!((norm - 1.0).abs() < 1e-4, "norm {}", norm);
        }

        #[test]
        fn featurize_equals_the_reference(s in any::<String>()) {
            let fz = f();
            prop_assert_eq!(fz.featurize(&s), reference(&fz, &s));
        }

        #[test]
        fn featurize_is_deterministic(s in any::<String>()) {
            let fz = f();
            prop_assert_eq!(fz.featurize(&s), fz.featurize(&s));
        }

        #[test]
        fn any_code_points_are_accepted(cps in proptest::collection::vec(any::<char>(), 0..300)) {
            let s: String = cps.into_iter().collect();
            let v = f().featurize(&s);
            prop_assert!(v.iter().all(|x| x.is_finite()));
        }

        #[test]
        fn lossy_utf8_is_accepted(bytes in proptest::collection::vec(any::<u8>(), 0..500)) {
            let s = String::from_utf8_lossy(&bytes);
            let v = f().featurize(&s);
            prop_assert!(v.iter().all(|x| x.is_finite()));
        }
    }
}
