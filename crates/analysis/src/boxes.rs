//! Boxes in pixel coordinates and boxes from maps.
//!
//! A [`PixelBox`] holds both corners inclusive: a box covering the single pixel (3, 4) is
//! `x0 = x1 = 3, y0 = y1 = 4`, and its area is `(x1 - x0 + 1) * (y1 - y0 + 1)`: the convention
//! of wsolevaluation's `calculate_multiple_iou` (Choe et al. 2020) and of the CAM papers.

/// A box with inclusive corners, `x0 <= x1` and `y0 <= y1` (pixels, floats once scaled).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PixelBox {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

impl PixelBox {
    pub fn new(x0: f32, y0: f32, x1: f32, y1: f32) -> Self {
        Self { x0, y0, x1, y1 }
    }

    /// `(x1 - x0 + 1) * (y1 - y0 + 1)`, zero for an inverted box.
    pub fn area(&self) -> f64 {
        let w = (self.x1 as f64 - self.x0 as f64 + 1.0).max(0.0);
        let h = (self.y1 as f64 - self.y0 as f64 + 1.0).max(0.0);
        w * h
    }

    /// Intersection over union, with the +1 pixel convention.
    pub fn iou(&self, other: &PixelBox) -> f64 {
        let x0 = self.x0.max(other.x0) as f64;
        let y0 = self.y0.max(other.y0) as f64;
        let x1 = self.x1.min(other.x1) as f64;
        let y1 = self.y1.min(other.y1) as f64;
        let inter = (x1 - x0 + 1.0).max(0.0) * (y1 - y0 + 1.0).max(0.0);
        let union = self.area() + other.area() - inter;
        if union <= 0.0 { 0.0 } else { inter / union }
    }

    /// The box clipped to an image of `width` x `height` pixels (`[0, width - 1]` and
    /// `[0, height - 1]`), and whether clipping changed it.
    pub fn clipped(&self, width: usize, height: usize) -> (PixelBox, bool) {
        let (w, h) = ((width.max(1) - 1) as f32, (height.max(1) - 1) as f32);
        let b = PixelBox {
            x0: self.x0.clamp(0.0, w),
            y0: self.y0.clamp(0.0, h),
            x1: self.x1.clamp(0.0, w),
            y1: self.y1.clamp(0.0, h),
        };
        (b, b != *self)
    }
}

/// The best IoU of any box of `estimated` with any of `truth` (0 when either is empty).
pub fn best_iou(estimated: &[PixelBox], truth: &[PixelBox]) -> f64 {
    estimated
        .iter()
        .flat_map(|e| truth.iter().map(move |t| e.iou(t)))
        .fold(0.0, f64::max)
}

/// One 8-connected component of a mask: its pixel count and tight box.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Component {
    pub pixels: usize,
    pub bbox: PixelBox,
}

/// The 8-connected components of `mask` (`[height, width]` row-major), in the order of their
/// first pixel in row-major order.
///
/// Labelled by runs: each row's runs of set pixels, joined (union-find, the earliest run as
/// the root) with the runs of the row above that touch them, diagonals included. A blob costs
/// its runs, not its pixels' neighbourhoods.
pub fn components(mask: &[bool], [height, width]: [usize; 2]) -> Vec<Component> {
    assert_eq!(mask.len(), height * width, "mask length");
    // (row, first column, last column) per run, row by row; rows[y] = the first run of row y.
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    let mut rows = Vec::with_capacity(height + 1);
    for (y, row) in mask.chunks_exact(width.max(1)).enumerate().take(height) {
        rows.push(runs.len());
        let mut x = 0;
        while x < width {
            if row[x] {
                let start = x;
                while x < width && row[x] {
                    x += 1;
                }
                runs.push((y, start, x - 1));
            } else {
                x += 1;
            }
        }
    }
    rows.push(runs.len());
    let mut parent: Vec<usize> = (0..runs.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for y in 1..height {
        for current in rows[y]..rows[y + 1] {
            let (_, x0, x1) = runs[current];
            for (above, &(_, a0, a1)) in runs.iter().enumerate().take(rows[y]).skip(rows[y - 1]) {
                if a0 <= x1 + 1 && x0 <= a1 + 1 {
                    let (ra, rb) = (root(&mut parent, above), root(&mut parent, current));
                    let (low, high) = (ra.min(rb), ra.max(rb));
                    parent[high] = low;
                }
            }
        }
    }
    // Components keyed by their root, the earliest run: row-major order of first pixels.
    let mut by_root: Vec<Option<usize>> = vec![None; runs.len()];
    let mut found: Vec<Component> = Vec::new();
    for (i, &(y, x0, x1)) in runs.iter().enumerate() {
        let r = root(&mut parent, i);
        let slot = *by_root[r].get_or_insert_with(|| {
            found.push(Component {
                pixels: 0,
                bbox: PixelBox::new(x0 as f32, y as f32, x1 as f32, y as f32),
            });
            found.len() - 1
        });
        let c = &mut found[slot];
        c.pixels += x1 - x0 + 1;
        c.bbox.x0 = c.bbox.x0.min(x0 as f32);
        c.bbox.x1 = c.bbox.x1.max(x1 as f32);
        c.bbox.y1 = c.bbox.y1.max(y as f32);
    }
    found
}

/// Which boxes a thresholded map yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    /// The tight box of the largest component (most pixels; the first found on a tie): the
    /// paper's and MaxBoxAcc's.
    Largest,
    /// The tight box of every component: MaxBoxAccV2's.
    All,
}

/// Boxes from `map` (`[height, width]`): foreground is `map >= threshold * max(map)`, then its
/// 8-connected components' tight boxes as `select` says. A map whose maximum is not positive
/// (all zeros: what min-max normalisation makes of a constant map) yields no box.
pub fn boxes_from_map(
    map: &[f32],
    shape: [usize; 2],
    threshold: f32,
    select: Select,
) -> Vec<PixelBox> {
    select_boxes(&foreground_components(map, shape, threshold), select)
}

/// The 8-connected components of `map >= threshold * max(map)` (none when the maximum is not
/// positive).
pub fn foreground_components(map: &[f32], shape: [usize; 2], threshold: f32) -> Vec<Component> {
    let max = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if map.is_empty() || max.is_nan() || max <= 0.0 {
        return Vec::new();
    }
    let cut = threshold * max;
    let mask: Vec<bool> = map.iter().map(|&v| v >= cut).collect();
    components(&mask, shape)
}

/// The boxes of `found` that `select` takes.
pub fn select_boxes(found: &[Component], select: Select) -> Vec<PixelBox> {
    match select {
        Select::All => found.iter().map(|c| c.bbox).collect(),
        Select::Largest => found
            .iter()
            .fold(None::<&Component>, |best, c| match best {
                Some(b) if b.pixels >= c.pixels => Some(b),
                _ => Some(c),
            })
            .map(|c| vec![c.bbox])
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map from rows of characters: `#` = 1.0, `+` = 0.5, `.` = 0.
    fn map(rows: &[&str]) -> (Vec<f32>, [usize; 2]) {
        let values = rows
            .iter()
            .flat_map(|r| {
                r.chars().map(|c| match c {
                    '#' => 1.0,
                    '+' => 0.5,
                    _ => 0.0,
                })
            })
            .collect();
        (values, [rows.len(), rows[0].len()])
    }

    #[test]
    fn iou_uses_the_inclusive_convention() {
        let a = PixelBox::new(0.0, 0.0, 9.0, 9.0); // 100 pixels
        let b = PixelBox::new(5.0, 0.0, 14.0, 9.0); // 100 pixels, 50 shared
        assert!((a.iou(&b) - 50.0 / 150.0).abs() < 1e-12);
        assert_eq!(a.iou(&a), 1.0);
        // Touching corners share one pixel.
        let c = PixelBox::new(9.0, 9.0, 12.0, 12.0);
        assert!((a.iou(&c) - 1.0 / (100.0 + 16.0 - 1.0)).abs() < 1e-12);
        // Disjoint.
        assert_eq!(a.iou(&PixelBox::new(20.0, 20.0, 21.0, 21.0)), 0.0);
        // A single pixel is a box of area 1.
        assert_eq!(PixelBox::new(3.0, 4.0, 3.0, 4.0).area(), 1.0);
        assert_eq!(best_iou(&[a, c], &[b, a]), 1.0);
        assert_eq!(best_iou(&[], &[a]), 0.0);
    }

    #[test]
    fn components_are_8_connected_with_tight_boxes() {
        let (m, shape) = map(&[
            "##......", //
            "##....#.", //
            "..#...#.", // (2,2) touches (1,1) diagonally: one blob with the 2x2
            "......##", //
            "#.......", // a single pixel on the border
        ]);
        let mask: Vec<bool> = m.iter().map(|&v| v > 0.0).collect();
        let found = components(&mask, shape);
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0].pixels, 5);
        assert_eq!(found[0].bbox, PixelBox::new(0.0, 0.0, 2.0, 2.0));
        assert_eq!(found[1].pixels, 4);
        assert_eq!(found[1].bbox, PixelBox::new(6.0, 1.0, 7.0, 3.0));
        assert_eq!(found[2].pixels, 1);
        assert_eq!(found[2].bbox, PixelBox::new(0.0, 4.0, 0.0, 4.0));
    }

    #[test]
    fn boxes_follow_the_threshold_and_the_selection() {
        let (m, shape) = map(&[
            "........", //
            ".###....", //
            ".###..++", //
            ".###..++", //
            "......++", //
        ]);
        // At 0.15 of the max both blobs are foreground; the 3x3 one is the larger.
        let largest = boxes_from_map(&m, shape, 0.15, Select::Largest);
        assert_eq!(largest, vec![PixelBox::new(1.0, 1.0, 3.0, 3.0)]);
        let all = boxes_from_map(&m, shape, 0.15, Select::All);
        assert_eq!(
            all,
            vec![
                PixelBox::new(1.0, 1.0, 3.0, 3.0),
                PixelBox::new(6.0, 2.0, 7.0, 4.0)
            ]
        );
        // Above 0.5 of the max only the 3x3 blob is left; a threshold of exactly 0.5 keeps
        // the half-valued one (foreground is >=).
        assert_eq!(boxes_from_map(&m, shape, 0.6, Select::All).len(), 1);
        assert_eq!(boxes_from_map(&m, shape, 0.5, Select::All).len(), 2);
        // Threshold 0 makes the whole map one component: the whole image.
        assert_eq!(
            boxes_from_map(&m, shape, 0.0, Select::Largest),
            vec![PixelBox::new(0.0, 0.0, 7.0, 4.0)]
        );
    }

    #[test]
    fn an_empty_or_flat_zero_map_has_no_box() {
        let (m, shape) = map(&["....", "...."]);
        assert!(boxes_from_map(&m, shape, 0.15, Select::Largest).is_empty());
        assert!(boxes_from_map(&[], [0, 0], 0.15, Select::All).is_empty());
    }

    #[test]
    fn clipping_says_when_it_changed_a_box() {
        let (b, changed) = PixelBox::new(-3.0, 2.0, 40.0, 9.0).clipped(32, 10);
        assert!(changed);
        assert_eq!(b, PixelBox::new(0.0, 2.0, 31.0, 9.0));
        let inside = PixelBox::new(1.0, 1.0, 5.0, 5.0);
        assert_eq!(inside.clipped(32, 10), (inside, false));
    }

    /// The run labelling against a plain flood fill over the 8 neighbours, on random masks of
    /// several densities (same components, same order, same boxes and counts).
    #[test]
    fn run_labelling_matches_a_flood_fill() {
        fn flood(mask: &[bool], [h, w]: [usize; 2]) -> Vec<Component> {
            let mut seen = vec![false; mask.len()];
            let mut found = Vec::new();
            for start in 0..mask.len() {
                if !mask[start] || seen[start] {
                    continue;
                }
                seen[start] = true;
                let mut stack = vec![start];
                let (mut x0, mut y0, mut x1, mut y1, mut pixels) =
                    (usize::MAX, usize::MAX, 0, 0, 0);
                while let Some(i) = stack.pop() {
                    let (y, x) = (i / w, i % w);
                    pixels += 1;
                    (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                    for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                        for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                            let j = ny * w + nx;
                            if mask[j] && !seen[j] {
                                seen[j] = true;
                                stack.push(j);
                            }
                        }
                    }
                }
                let bbox = PixelBox::new(x0 as f32, y0 as f32, x1 as f32, y1 as f32);
                found.push(Component { pixels, bbox });
            }
            found
        }
        let mut state = 12345u64;
        for (shape, density) in [
            ([17, 23], 0.3),
            ([32, 32], 0.5),
            ([9, 40], 0.7),
            ([1, 13], 0.5),
        ] {
            let mask: Vec<bool> = (0..shape[0] * shape[1])
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) as f64 / (1u64 << 31) as f64) < density
                })
                .collect();
            assert_eq!(
                components(&mask, shape),
                flood(&mask, shape),
                "{shape:?} at {density}"
            );
        }
    }
}
