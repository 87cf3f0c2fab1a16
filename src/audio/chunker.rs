//! Cuts a stream of PCM frames (any length) into fixed 512-sample chunks at 16 kHz.

/// Samples per VAD chunk (32 ms at 16 kHz).
pub const CHUNK: usize = 512;

/// Accumulates PCM and yields whole chunks, in order, numbered from the start of the stream.
#[derive(Default)]
pub struct Chunker {
    partial: Vec<i16>,
    next_index: u64,
}

impl Chunker {
    /// Appends `pcm` and calls `emit(index, chunk)` for every chunk completed.
    pub fn push(&mut self, mut pcm: &[i16], mut emit: impl FnMut(u64, &[i16; CHUNK])) {
        while !pcm.is_empty() {
            let take = (CHUNK - self.partial.len()).min(pcm.len());
            self.partial.extend_from_slice(&pcm[..take]);
            pcm = &pcm[take..];
            if self.partial.len() == CHUNK {
                if let Ok(chunk) = <&[i16; CHUNK]>::try_from(self.partial.as_slice()) {
                    emit(self.next_index, chunk);
                }
                self.next_index += 1;
                self.partial.clear();
            }
        }
    }

    /// Forgets the partial chunk and restarts numbering.
    pub fn reset(&mut self) {
        self.partial.clear();
        self.next_index = 0;
    }

    /// Chunks emitted since the last reset.
    pub fn emitted(&self) -> u64 {
        self.next_index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_of_960_become_chunks_of_512_without_loss() {
        let mut c = Chunker::default();
        let mut out: Vec<(u64, i16)> = vec![];
        let frame: Vec<i16> = (0..960).map(|i| i as i16).collect();
        for _ in 0..8 {
            c.push(&frame, |i, ch| out.push((i, ch[0])));
        }
        // 8 × 960 = 7680 samples = 15 chunks exactly.
        assert_eq!(out.len(), 15);
        assert_eq!(out[0], (0, 0));
        assert_eq!(out[1], (1, 512));
        assert_eq!(out[2], (2, 64)); // 1024 - 960
        assert_eq!(c.emitted(), 15);
    }
}
