//! The memory pattern used to check that a branch captures one instant.
//!
//! A writer in the guest sweeps a buffer page by page, forever. Every page
//! holds `PAGE_MAGIC`, a run id, its index, the sweep sequence number, a body
//! derived from (sequence, index), and the sequence again at its end; after
//! each page the writer records (sequence, index) in a control page. A RAM
//! image captured at one instant therefore shows: pages up to the control
//! index with the control sequence, later pages with the sequence before it,
//! every page intact — except at most the one page being written at that
//! instant. [`verify_image`] checks exactly that, over a raw RAM image.

/// First 8 bytes of every data page.
pub const PAGE_MAGIC: [u8; 8] = *b"FKDMPAGE";
/// First 8 bytes of the control page.
pub const CTRL_MAGIC: [u8; 8] = *b"FKDMCTRL";
pub const PAGE: usize = 4096;

/// Body word `j` of page `index` in sweep `seq`.
pub fn word(seq: u64, index: u64, j: u64) -> u64 {
    (seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index.wrapping_mul(0xc2b2_ae3d_27d4_eb4f))
        .rotate_left((j % 63) as u32)
        ^ j
}

/// Fills `page` for (`run`, `index`, `seq`).
pub fn fill_page(page: &mut [u8], run: u64, index: u64, seq: u64) {
    page[0..8].copy_from_slice(&PAGE_MAGIC);
    page[8..16].copy_from_slice(&run.to_le_bytes());
    page[16..24].copy_from_slice(&index.to_le_bytes());
    page[24..32].copy_from_slice(&seq.to_le_bytes());
    for j in 4..(PAGE / 8 - 1) {
        page[j * 8..j * 8 + 8].copy_from_slice(&word(seq, index, j as u64).to_le_bytes());
    }
    page[PAGE - 8..].copy_from_slice(&seq.to_le_bytes());
}

/// The control word: sweep sequence (high 32 bits) and page index (low 32).
pub fn control_word(seq: u64, index: u64) -> u64 {
    (seq << 32) | (index & 0xffff_ffff)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A page's (index, seq) if it is an intact page of `run`; `Err(index)` if it
/// belongs to `run` but is torn.
fn read_page(page: &[u8], run: u64) -> Option<Result<(u64, u64), u64>> {
    if page[0..8] != PAGE_MAGIC || u64_at(page, 8) != run {
        return None;
    }
    let (index, seq) = (u64_at(page, 16), u64_at(page, 24));
    let intact = u64_at(page, PAGE - 8) == seq
        && (4..(PAGE / 8 - 1)).all(|j| u64_at(page, j * 8) == word(seq, index, j as u64));
    Some(if intact { Ok((index, seq)) } else { Err(index) })
}

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub pages: u64,
    pub control_seq: u64,
    pub control_index: u64,
}

/// Checks a raw RAM image for run `run` of `pages` pages. `Err` says what is
/// wrong: a missing, duplicated, torn or out-of-instant page.
pub fn verify_image(image: &[u8], run: u64, pages: u64) -> Result<Verdict, String> {
    let mut seen: Vec<Option<Result<u64, ()>>> = vec![None; pages as usize];
    let mut control = None;
    for page in image.chunks_exact(PAGE) {
        if page[0..8] == CTRL_MAGIC && u64_at(page, 8) == run {
            if control.is_some() {
                return Err("two control pages".into());
            }
            let w = u64_at(page, 16);
            control = Some((w >> 32, w & 0xffff_ffff));
            continue;
        }
        match read_page(page, run) {
            None => {}
            Some(r) => {
                let index = match r {
                    Ok((i, _)) | Err(i) => i,
                };
                let slot = seen
                    .get_mut(index as usize)
                    .ok_or_else(|| format!("page index {index} out of range"))?;
                if slot.is_some() {
                    return Err(format!("page {index} appears twice in the image"));
                }
                *slot = Some(r.map(|(_, s)| s).map_err(|_| ()));
            }
        }
    }
    let (cseq, cidx) = control.ok_or("no control page in the image")?;
    for (i, s) in seen.iter().enumerate() {
        let i = i as u64;
        // The page in flight at the instant may be torn or old or new.
        let in_flight = i == cidx + 1 || (cidx + 1 == pages && i == 0);
        match s {
            None => return Err(format!("page {i} is missing")),
            Some(Err(())) if in_flight => {}
            Some(Err(())) => {
                return Err(format!(
                    "page {i} is torn (control at seq {cseq} page {cidx})"
                ))
            }
            Some(Ok(seq)) => {
                let expect = if i <= cidx {
                    cseq
                } else {
                    cseq.saturating_sub(1)
                };
                if *seq != expect && !in_flight {
                    return Err(format!(
                        "page {i} has seq {seq}, the instant says {expect} (control at seq {cseq} page {cidx})"
                    ));
                }
            }
        }
    }
    Ok(Verdict {
        pages,
        control_seq: cseq,
        control_index: cidx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(pages: u64, seq: u64, idx: u64, run: u64) -> Vec<u8> {
        let mut img = vec![0u8; PAGE * (pages as usize + 3)];
        for i in 0..pages {
            let s = if i <= idx { seq } else { seq - 1 };
            let at = PAGE * (i as usize + 2);
            fill_page(&mut img[at..at + PAGE], run, i, s);
        }
        let c = &mut img[PAGE * (pages as usize + 2)..];
        c[0..8].copy_from_slice(&CTRL_MAGIC);
        c[8..16].copy_from_slice(&run.to_le_bytes());
        c[16..24].copy_from_slice(&control_word(seq, idx).to_le_bytes());
        img
    }

    #[test]
    fn a_consistent_instant_passes() {
        let v = verify_image(&image(64, 5, 20, 7), 7, 64).unwrap();
        assert_eq!((v.control_seq, v.control_index), (5, 20));
        // Another run's pages are ignored.
        assert!(verify_image(&image(64, 5, 20, 8), 7, 64).is_err());
    }

    #[test]
    fn torn_newer_older_missing_and_duplicate_pages_fail() {
        let base = image(64, 5, 20, 7);
        let at = |i: usize| PAGE * (i + 2);
        let mut torn = base.clone();
        torn[at(40) + 100] ^= 1;
        assert!(verify_image(&torn, 7, 64).unwrap_err().contains("torn"));
        let mut newer = base.clone();
        fill_page(&mut newer[at(40)..at(40) + PAGE], 7, 40, 5);
        assert!(verify_image(&newer, 7, 64).unwrap_err().contains("seq 5"));
        let mut older = base.clone();
        fill_page(&mut older[at(3)..at(3) + PAGE], 7, 3, 4);
        assert!(verify_image(&older, 7, 64).unwrap_err().contains("seq 4"));
        let mut missing = base.clone();
        missing[at(9)] = 0;
        assert!(verify_image(&missing, 7, 64)
            .unwrap_err()
            .contains("missing"));
        let mut dup = base.clone();
        let copy = dup[at(9)..at(9) + PAGE].to_vec();
        dup[0..PAGE].copy_from_slice(&copy);
        assert!(verify_image(&dup, 7, 64).unwrap_err().contains("twice"));
        // The page in flight (21) may be torn.
        let mut flight = base;
        flight[at(21) + 100] ^= 1;
        assert!(verify_image(&flight, 7, 64).is_ok());
    }
}
