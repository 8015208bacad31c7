//! Streaming best-fit-decreasing packing of documents into bins of `seq_len` tokens.
//!
//! Documents arrive one at a time. They are buffered in a window; when the window is full it is
//! sorted by length (largest first, ties in a seed-dependent but fixed order) and each document
//! goes into the open bin with the least room that still fits it, or a new bin. Open bins carry
//! over to the next window so later small documents fill earlier gaps. Memory is bounded by the
//! window plus `max_open_bins`: when more bins are open, the fullest are closed first. A full
//! bin is closed at once. Before bins are closed an improvement pass tries to empty the least
//! filled open bins into the gaps of the others (see `Packer::improve`), since best fit alone
//! leaves a bin or two of slack when many documents are longer than half a bin. Same input,
//! same config, same seed → same bins.
use std::collections::BTreeSet;

/// Something with a token length that can be cut (only documents longer than `seq_len` are).
pub trait Packable {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Splits off the first `at` tokens.
    fn split_at(self, at: usize) -> (Self, Self)
    where
        Self: Sized;
}

impl Packable for usize {
    fn len(&self) -> usize {
        *self
    }
    fn split_at(self, at: usize) -> (Self, Self) {
        (at, self - at)
    }
}

pub use davinci_core::packed::LongDocs;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PackConfig {
    pub seq_len: usize,
    /// Documents sorted together.
    pub window: usize,
    /// Bins kept open across windows.
    pub max_open_bins: usize,
    pub long_docs: LongDocs,
    pub seed: u64,
}

impl Default for PackConfig {
    fn default() -> Self {
        Self {
            seq_len: 32_768,
            window: 8_192,
            max_open_bins: 512,
            long_docs: LongDocs::Drop,
            seed: 0,
        }
    }
}

/// Counters of one packer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackStats {
    /// Documents accepted (before splitting).
    pub documents: u64,
    /// Tokens in closed bins.
    pub tokens: u64,
    pub bins: u64,
    /// Documents longer than `seq_len` that were split.
    pub split_documents: u64,
    /// Documents longer than `seq_len` that were dropped.
    pub dropped_too_long: u64,
    pub dropped_empty: u64,
}

impl PackStats {
    /// Share of bin capacity that is padding.
    pub fn padding_ratio(&self, seq_len: usize) -> f64 {
        let cap = self.bins as f64 * seq_len as f64;
        if cap == 0.0 {
            0.0
        } else {
            (cap - self.tokens as f64) / cap
        }
    }
}

struct OpenBin<T> {
    items: Vec<T>,
    used: usize,
}

pub struct Packer<T> {
    cfg: PackConfig,
    window: Vec<(u64, T)>,
    seq: u64,
    bins: Vec<Option<OpenBin<T>>>,
    free_slots: Vec<usize>,
    /// (remaining room, open order, slot).
    by_room: BTreeSet<(usize, u64, usize)>,
    open_order: Vec<u64>,
    next_open: u64,
    stats: PackStats,
}

/// Failed attempts in a row after which a sweep between windows stops: there the open bins
/// still have room for later documents, so most attempts fail, and the bins that matter (those
/// about to close) gain little from more. The last sweep, when every bin closes, has no limit.
const PATIENCE_BETWEEN_WINDOWS: usize = 16;

/// Swaps take two documents at once only from lists this short: pairs grow quadratically, and
/// in a bin of many short documents a pair gains little over one.
const PAIRS_UP_TO: usize = 64;

/// One document (by index) or two (the second with a larger index).
type Pick = (usize, Option<usize>);

/// (total length, first, second) of every one document of `docs` and, up to `PAIRS_UP_TO`
/// documents, every two.
fn subsets<T: Packable>(docs: &[T]) -> Vec<(usize, usize, Option<usize>)> {
    let pairs = docs.len() <= PAIRS_UP_TO;
    let mut v = Vec::new();
    for (i, a) in docs.iter().enumerate() {
        v.push((a.len(), i, None));
        if pairs {
            for (j, b) in docs.iter().enumerate().skip(i + 1) {
                v.push((a.len() + b.len(), i, Some(j)));
            }
        }
    }
    v
}

/// The exchange of one or two of `docs` (in a bin with `room` left) for one or two pool
/// documents (`sums`, from `subsets`, shortest first) that adds the most tokens to the bin:
/// (tokens added, pool pick, bin pick).
fn best_swap<T: Packable>(
    docs: &[T],
    room: usize,
    sums: &[(usize, usize, Option<usize>)],
) -> Option<(usize, Pick, Pick)> {
    let longest_in = sums.last()?.0;
    let mut best: Option<(usize, Pick, Pick)> = None;
    let mut consider = |out_len: usize, out: Pick| {
        let fit = sums.partition_point(|x| x.0 <= out_len + room);
        if let Some(&(in_len, a, b)) = fit.checked_sub(1).map(|i| &sums[i]) {
            let gain = in_len.saturating_sub(out_len);
            if gain > best.map_or(0, |b| b.0) {
                best = Some((gain, (a, b), out));
            }
        }
        best.is_some_and(|b| b.0 == room)
    };
    let pairs = docs.len() <= PAIRS_UP_TO;
    for (i, a) in docs.iter().enumerate() {
        // What goes out must be shorter than what comes in.
        if a.len() >= longest_in {
            continue;
        }
        if consider(a.len(), (i, None)) {
            break;
        }
        for (j, b) in docs.iter().enumerate().skip(i + 1).filter(|_| pairs) {
            let out_len = a.len() + b.len();
            if out_len < longest_in && consider(out_len, (i, Some(j))) {
                return best;
            }
        }
    }
    best
}

/// splitmix64: a fixed, seedable tie-break order.
fn mix(seed: u64, x: u64) -> u64 {
    let mut z = seed.wrapping_add(x.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<T: Packable> Packer<T> {
    pub fn new(cfg: PackConfig) -> Self {
        assert!(cfg.seq_len > 0 && cfg.window > 0 && cfg.max_open_bins > 0);
        Self {
            cfg,
            window: Vec::new(),
            seq: 0,
            bins: Vec::new(),
            free_slots: Vec::new(),
            by_room: BTreeSet::new(),
            open_order: Vec::new(),
            next_open: 0,
            stats: PackStats::default(),
        }
    }

    pub fn config(&self) -> &PackConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &PackStats {
        &self.stats
    }

    /// Adds a document; closed bins are appended to `out`.
    pub fn push(&mut self, doc: T, out: &mut Vec<Vec<T>>) {
        if doc.is_empty() {
            self.stats.dropped_empty += 1;
            return;
        }
        self.stats.documents += 1;
        let s = self.cfg.seq_len;
        let mut doc = doc;
        if doc.len() > s {
            match self.cfg.long_docs {
                LongDocs::Drop => {
                    self.stats.documents -= 1;
                    self.stats.dropped_too_long += 1;
                    return;
                }
                LongDocs::Split => {
                    self.stats.split_documents += 1;
                    while doc.len() > s {
                        let (head, rest) = doc.split_at(s);
                        self.stats.bins += 1;
                        self.stats.tokens += s as u64;
                        out.push(vec![head]);
                        doc = rest;
                    }
                    if doc.is_empty() {
                        return;
                    }
                }
            }
        }
        let key = mix(self.cfg.seed, self.seq);
        self.seq += 1;
        self.window.push((key, doc));
        if self.window.len() >= self.cfg.window {
            self.place_window(PATIENCE_BETWEEN_WINDOWS, out);
        }
    }

    /// Places what is buffered and closes every open bin.
    pub fn finish(&mut self, out: &mut Vec<Vec<T>>) {
        self.place_window(usize::MAX, out);
        let mut open: Vec<(u64, usize)> =
            self.by_room.iter().map(|&(_, o, slot)| (o, slot)).collect();
        open.sort_unstable();
        for (_, slot) in open {
            self.close(slot, out);
        }
    }

    /// Places the window, improves the open bins (`patience`: see `improve`) and closes full
    /// ones and, beyond `max_open_bins`, the fullest.
    fn place_window(&mut self, patience: usize, out: &mut Vec<Vec<T>>) {
        let mut window = std::mem::take(&mut self.window);
        window.sort_unstable_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        for (_, doc) in window {
            let len = doc.len();
            let slot = match self.by_room.range((len, 0, 0)..).next().copied() {
                Some(entry) => {
                    self.by_room.remove(&entry);
                    entry.2
                }
                None => self.open_bin(),
            };
            let bin = self.bins[slot].as_mut().expect("open slot");
            bin.items.push(doc);
            bin.used += len;
            if bin.used == self.cfg.seq_len {
                self.close(slot, out);
            } else {
                self.by_room.insert(self.key(slot));
            }
        }
        self.improve(patience);
        let full: Vec<usize> = self.by_room.range(..(1, 0, 0)).map(|k| k.2).collect();
        for slot in full {
            self.close(slot, out);
        }
        while self.by_room.len() > self.cfg.max_open_bins {
            let fullest = *self.by_room.iter().next().expect("non-empty");
            self.by_room.remove(&fullest);
            self.close(fullest.2, out);
        }
    }

    /// The `by_room` entry of an open bin.
    fn key(&self, slot: usize) -> (usize, u64, usize) {
        let used = self.bins[slot].as_ref().expect("open slot").used;
        (self.cfg.seq_len - used, self.open_order[slot], slot)
    }

    /// Tries to empty the open bins, least filled first, into the others; sweeps again while a
    /// sweep removes a bin. A bin whose documents outweigh the room of all the others is not
    /// tried, and a sweep stops after `patience` failed attempts in a row. Only open bins take
    /// part, so memory stays bounded and nothing is ever cut.
    fn improve(&mut self, patience: usize) {
        let s = self.cfg.seq_len;
        loop {
            let mut room: usize = self.by_room.iter().map(|k| k.0).sum();
            let order: Vec<usize> = self.by_room.iter().rev().map(|k| k.2).collect();
            let mut eliminated = false;
            let mut failures = 0;
            for slot in order {
                if failures == patience {
                    break;
                }
                let Some(bin) = self.bins[slot].as_ref() else {
                    continue;
                };
                if bin.used > room - (s - bin.used) {
                    continue;
                }
                if self.try_empty(slot) {
                    room -= s;
                    eliminated = true;
                    failures = 0;
                } else {
                    failures += 1;
                }
            }
            if !eliminated {
                return;
            }
        }
    }

    /// Moves the documents of `slot` into the other open bins: each into the fullest bin it fits
    /// (largest first); what fits nowhere is swapped into a fuller bin for up to two smaller
    /// documents there (`swap_into_fuller`), which then get their turn. True if the bin emptied;
    /// otherwise it keeps what is left, having given tokens to bins fuller than itself.
    fn try_empty(&mut self, slot: usize) -> bool {
        self.by_room.remove(&self.key(slot));
        let bin = self.bins[slot].as_mut().expect("open slot");
        let mut pool = std::mem::take(&mut bin.items);
        loop {
            // Stable: equal lengths keep their (deterministic) order.
            pool.sort_by_key(|d| std::cmp::Reverse(d.len()));
            let mut rest = Vec::new();
            for doc in pool {
                match self.by_room.range((doc.len(), 0, 0)..).next().copied() {
                    Some(key) => {
                        self.by_room.remove(&key);
                        let bin = self.bins[key.2].as_mut().expect("open slot");
                        bin.used += doc.len();
                        bin.items.push(doc);
                        self.by_room.insert(self.key(key.2));
                    }
                    None => rest.push(doc),
                }
            }
            pool = rest;
            // Each swap moves at least one token out of the pool, so this ends.
            if pool.is_empty() || !self.swap_into_fuller(&mut pool) {
                break;
            }
        }
        if pool.is_empty() {
            self.bins[slot] = None;
            self.free_slots.push(slot);
            return true;
        }
        let bin = self.bins[slot].as_mut().expect("open slot");
        bin.used = pool.iter().map(Packable::len).sum();
        bin.items = pool;
        self.by_room.insert(self.key(slot));
        false
    }

    /// Finds the fullest open bin, at least as full as `pool`, where one or two pool documents
    /// can replace one or two of its documents and leave it fuller (as full as possible), and
    /// makes that exchange. False if there is none.
    fn swap_into_fuller(&mut self, pool: &mut Vec<T>) -> bool {
        let s = self.cfg.seq_len;
        let pool_used: usize = pool.iter().map(Packable::len).sum();
        // (length, first, second) of every one or two pool documents, shortest first.
        let mut sums = subsets(pool);
        sums.sort_unstable();
        let mut found = None;
        for &(room, _, slot) in self.by_room.range((1, 0, 0)..) {
            if s - room < pool_used {
                break;
            }
            let items = &self.bins[slot].as_ref().expect("open slot").items;
            let best = best_swap(items, room, &sums);
            if let Some(b) = best {
                found = Some((slot, b));
                break;
            }
        }
        let Some((slot, (_, (in_a, in_b), (out_a, out_b)))) = found else {
            return false;
        };
        self.by_room.remove(&self.key(slot));
        let bin = self.bins[slot].as_mut().expect("open slot");
        let mut out = Vec::with_capacity(2);
        if let Some(b) = out_b {
            out.push(bin.items.remove(b));
        }
        out.push(bin.items.remove(out_a));
        let second = in_b.map(|b| pool.remove(b));
        bin.items.push(pool.remove(in_a));
        bin.items.extend(second);
        bin.used = bin.items.iter().map(Packable::len).sum();
        pool.extend(out);
        self.by_room.insert(self.key(slot));
        true
    }

    fn open_bin(&mut self) -> usize {
        let bin = OpenBin {
            items: Vec::new(),
            used: 0,
        };
        let order = self.next_open;
        self.next_open += 1;
        match self.free_slots.pop() {
            Some(slot) => {
                self.bins[slot] = Some(bin);
                self.open_order[slot] = order;
                slot
            }
            None => {
                self.bins.push(Some(bin));
                self.open_order.push(order);
                self.bins.len() - 1
            }
        }
    }

    fn close(&mut self, slot: usize, out: &mut Vec<Vec<T>>) {
        let bin = self.bins[slot].take().expect("open slot");
        let room = self.cfg.seq_len - bin.used;
        self.by_room.remove(&(room, self.open_order[slot], slot));
        self.free_slots.push(slot);
        self.stats.bins += 1;
        self.stats.tokens += bin.used as u64;
        out.push(bin.items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(lens: &[usize], cfg: PackConfig) -> (Vec<Vec<usize>>, PackStats) {
        let mut p = Packer::new(cfg);
        let mut out = Vec::new();
        for &l in lens {
            p.push(l, &mut out);
        }
        p.finish(&mut out);
        (out, p.stats().clone())
    }

    /// Log-normal lengths (Box-Muller on a splitmix stream), capped below nothing.
    pub(crate) fn lognormal(n: usize, mu: f64, sigma: f64, seed: u64) -> Vec<usize> {
        let u = |i: u64| (mix(seed, i) >> 11) as f64 / (1u64 << 53) as f64;
        (0..n as u64)
            .map(|i| {
                let (u1, u2) = (u(2 * i).max(1e-300), u(2 * i + 1));
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                ((mu + sigma * z).exp().round() as usize).max(1)
            })
            .collect()
    }

    /// ⌈tokens / seq_len⌉ and the allowance 1.001 × that + 1.
    fn bound(tokens: usize, seq_len: usize) -> (usize, usize) {
        let lower = tokens.div_ceil(seq_len);
        (lower, (1.001 * lower as f64).floor() as usize + 1)
    }

    /// Long documents split, as the bound tests below assume.
    fn split() -> PackConfig {
        PackConfig {
            long_docs: LongDocs::Split,
            ..Default::default()
        }
    }

    /// Bins hold at most `seq_len` tokens and their pieces are exactly the documents, except that
    /// ones longer than `seq_len` are in `seq_len` pieces plus a remainder.
    fn assert_nothing_cut(lens: &[usize], bins: &[Vec<usize>], seq_len: usize) {
        let mut expected: Vec<usize> = Vec::new();
        for &l in lens.iter().filter(|&&l| l > 0) {
            let mut l = l;
            while l > seq_len {
                expected.push(seq_len);
                l -= seq_len;
            }
            expected.push(l);
        }
        let mut got: Vec<usize> = bins.iter().flatten().copied().collect();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected);
        assert!(bins.iter().all(|b| b.iter().sum::<usize>() <= seq_len));
    }

    /// Best fit leaves three bins, [46 41] [37 29 19] [19], for 191 tokens; moves alone do not
    /// get to two, a swap (41 in for 29 out) does.
    #[test]
    fn improvement_swaps_to_empty_a_bin() {
        let lens = [41, 37, 29, 46, 19, 19];
        let cfg = PackConfig {
            seq_len: 100,
            ..Default::default()
        };
        let (bins, st) = pack(&lens, cfg);
        assert_nothing_cut(&lens, &bins, 100);
        assert_eq!(bins.len(), 2, "{bins:?}");
        assert_eq!(st.bins, 2);
        assert_eq!(st.tokens, 191);
    }

    /// Token lengths (EOD included, Qwen2.5 tokenizer) of the pallets/click ctx-python and
    /// ctx-general samples at seq_len 32,768: about 40% of the documents are longer than half a
    /// bin, and best fit alone used 176 bins where ⌈T/S⌉ is 174.
    const CLICK_CTX: &str = include_str!("testdata/click_ctx_lengths.txt");

    #[test]
    fn real_context_samples_pack_within_bound() {
        let s = 32_768;
        for line in CLICK_CTX.lines() {
            let (name, lens) = line.split_once(':').expect("name: lengths");
            let lens: Vec<usize> = lens
                .split_whitespace()
                .map(|l| l.parse().expect("length"))
                .collect();
            let (bins, _) = pack(&lens, split());
            assert_nothing_cut(&lens, &bins, s);
            let (lower, bound) = bound(lens.iter().sum(), s);
            eprintln!("{name}: {} bins, ceil(T/S) {lower}", bins.len());
            assert!(bins.len() <= bound, "{name}: {} bins > {bound}", bins.len());
        }
    }

    /// Small windows and few open bins, so the improvement pass runs between windows on bins
    /// that later windows keep filling.
    #[test]
    fn improvement_between_windows_keeps_every_document() {
        // Seed 0 starts the stream at u = 0, an astronomically long first document.
        for seed in 1..=20 {
            let lens = lognormal(3_000, 6.5, 1.2, seed);
            let cfg = PackConfig {
                seq_len: 4096,
                window: 64,
                max_open_bins: 8,
                seed,
                ..split()
            };
            let (bins, st) = pack(&lens, cfg.clone());
            assert_nothing_cut(&lens, &bins, 4096);
            assert_eq!(st.tokens as usize, lens.iter().sum::<usize>());
            assert_eq!(st.bins as usize, bins.len());
            assert_eq!(pack(&lens, cfg).0, bins);
        }
    }

    #[test]
    fn bins_respect_capacity_and_keep_every_token() {
        let cfg = PackConfig {
            seq_len: 100,
            window: 7,
            max_open_bins: 3,
            ..split()
        };
        let lens = [30, 70, 100, 250, 5, 95, 1, 50, 50, 0, 99];
        let (bins, st) = pack(&lens, cfg.clone());
        assert!(bins.iter().all(|b| b.iter().sum::<usize>() <= 100));
        assert_eq!(
            bins.iter().flatten().sum::<usize>(),
            lens.iter().sum::<usize>()
        );
        assert_eq!(st.split_documents, 1);
        assert_eq!(st.dropped_empty, 1);
        assert_eq!(st.tokens, lens.iter().sum::<usize>() as u64);
        let (_, dropped) = pack(
            &lens,
            PackConfig {
                long_docs: LongDocs::Drop,
                ..cfg
            },
        );
        assert_eq!(dropped.dropped_too_long, 1);
        assert_eq!(dropped.split_documents, 0);
        assert_eq!(dropped.tokens, (lens.iter().sum::<usize>() - 250) as u64);
        assert_eq!(PackConfig::default().long_docs, LongDocs::Drop);
    }

    #[test]
    fn deterministic_for_a_seed() {
        let lens = lognormal(5_000, 6.0, 1.0, 7);
        let cfg = PackConfig {
            seq_len: 4096,
            window: 500,
            ..Default::default()
        };
        let a = pack(&lens, cfg.clone());
        let b = pack(&lens, cfg);
        assert_eq!(a.0, b.0);
    }

    /// The bound: bins ≤ 1.001 × ⌈tokens / seq_len⌉ + 1 with no document shorter than
    /// seq_len cut, at seq_len 32,768, on one million log-normal documents.
    #[test]
    fn million_lognormal_documents_pack_within_bound() {
        let s = 32_768;
        // Median 2,000 tokens, σ = 1.0 (mean ≈ 3,300): about ten documents per bin.
        let lens = lognormal(1_000_000, (2_000f64).ln(), 1.0, 42);
        let (bins, st) = pack(&lens, split());
        let total: usize = lens.iter().sum();
        let (lower, bound) = bound(total, s);
        assert_nothing_cut(&lens, &bins, s);
        eprintln!(
            "1M log-normal docs: {} tokens, {} bins (lower bound {}, allowed {}), padding ratio {:.5}, {} long docs split",
            total,
            bins.len(),
            lower,
            bound,
            st.padding_ratio(s),
            st.split_documents
        );
        assert_eq!(st.tokens as usize, total);
        assert!(bins.len() <= bound, "{} bins > {bound}", bins.len());
    }
}
