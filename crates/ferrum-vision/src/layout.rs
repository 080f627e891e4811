//! Where an image's tokens go in a prompt, as mtmd lays them out for each projector: the
//! text and special tokens around each encoder input (tile or overview) and their order.

use crate::mmproj::Projector;
use crate::preprocess::Preprocessed;

/// One piece of an image's part of a prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Text tokenized with special tokens recognised (mtmd's `add_text(.., parse_special)`).
    Text(String),
    /// One vocabulary token, found by its exact text (mtmd's `lookup_token`).
    Token(&'static str),
    /// The image tokens of encoder input `i` (see [`crate::EncodedImage::inputs`]).
    Image(usize),
}

/// The pieces of one image: encoder inputs are numbered tiles first (row-major), then the
/// overview.
pub fn pieces(projector: Projector, pre: &Preprocessed) -> Vec<Piece> {
    match projector {
        Projector::Mlp => vec![Piece::Image(0)],
        Projector::Idefics3 { .. } => {
            // mtmd's MTMD_SLICE_TMPL_IDEFICS3: tiles first, "\n" between rows (not after the
            // last), then "\n\n<fake_token_around_image><global-img>" overview
            // "<fake_token_around_image>".
            let (cols, rows) = pre.grid;
            let mut out = Vec::new();
            for y in 0..rows {
                for x in 0..cols {
                    out.push(Piece::Text(format!(
                        "<fake_token_around_image><row_{}_col_{}>",
                        y + 1,
                        x + 1
                    )));
                    out.push(Piece::Image(y * cols + x));
                }
                if y + 1 != rows {
                    out.push(Piece::Token("\n"));
                }
            }
            out.push(Piece::Token("\n\n"));
            out.push(Piece::Token("<fake_token_around_image>"));
            out.push(Piece::Token("<global-img>"));
            out.push(Piece::Image(pre.tiles.len()));
            out.push(Piece::Token("<fake_token_around_image>"));
            out
        }
    }
}
