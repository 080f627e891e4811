//! A training run's resumable state, as bytes: a JSON header line, then every array as
//! little-endian f32.

use serde::{Deserialize, Serialize};

use crate::TrainError;

const MAGIC: &[u8] = b"ferrum-lora-state 1\n";

pub struct State {
    pub total_steps: usize,
    /// The last completed epoch (1-based) and the optimizer steps taken by then.
    pub epoch: u32,
    pub step: usize,
    pub trained_tokens: u64,
    pub params: Vec<Vec<f32>>,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    total_steps: usize,
    epoch: u32,
    step: usize,
    trained_tokens: u64,
    /// Lengths of the params, then m, then v arrays.
    lens: Vec<usize>,
}

impl State {
    pub fn encode(&self) -> Vec<u8> {
        let arrays = || self.params.iter().chain(&self.m).chain(&self.v);
        let header = Header {
            total_steps: self.total_steps,
            epoch: self.epoch,
            step: self.step,
            trained_tokens: self.trained_tokens,
            lens: arrays().map(Vec::len).collect(),
        };
        let mut out = MAGIC.to_vec();
        out.extend(serde_json::to_vec(&header).expect("a header serializes"));
        out.push(b'\n');
        for a in arrays() {
            for x in a {
                out.extend(x.to_le_bytes());
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, TrainError> {
        let bad = |m: &str| TrainError::BadCheckpoint(m.to_string());
        let rest = bytes
            .strip_prefix(MAGIC)
            .ok_or_else(|| bad("not a ferrum training state"))?;
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("no header"))?;
        let header: Header =
            serde_json::from_slice(&rest[..nl]).map_err(|e| bad(&format!("header: {e}")))?;
        let mut data = &rest[nl + 1..];
        if !header.lens.len().is_multiple_of(3)
            || data.len() != header.lens.iter().sum::<usize>() * 4
        {
            return Err(bad("truncated"));
        }
        let mut arrays = Vec::with_capacity(header.lens.len());
        for &len in &header.lens {
            let (a, b) = data.split_at(len * 4);
            arrays.push(
                a.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<f32>>(),
            );
            data = b;
        }
        let third = arrays.len() / 3;
        let v = arrays.split_off(2 * third);
        let m = arrays.split_off(third);
        Ok(State {
            total_steps: header.total_steps,
            epoch: header.epoch,
            step: header.step,
            trained_tokens: header.trained_tokens,
            params: arrays,
            m,
            v,
        })
    }
}
