//! Per-image box masks built on the device in one batched expression (no loop over images).

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::cutmix::CutBox;

/// A `[batch, 1, height, width]` mask: 1 inside image `i`'s box `boxes[i]`, 0 outside.
///
/// Built from row and column indices compared with each image's bounds, so the work is a
/// handful of broadcast tensor ops whatever the batch size.
pub fn box_masks(boxes: &[CutBox], height: usize, width: usize, device: &Device) -> Tensor<4> {
    let batch = boxes.len();
    let bound = |edge: fn(&CutBox) -> usize| {
        let values: Vec<i64> = boxes.iter().map(|b| edge(b) as i64).collect();
        Tensor::<4, Int>::from_data(TensorData::new(values, [batch, 1, 1, 1]), device)
    };
    let rows = Tensor::<1, Int>::arange(0..height as i64, device).reshape([1, 1, height, 1]);
    let cols = Tensor::<1, Int>::arange(0..width as i64, device).reshape([1, 1, 1, width]);
    let in_rows = (rows.clone() - bound(|b| b.y1))
        .greater_equal_scalar(0)
        .bool_and((rows - bound(|b| b.y2)).lower_scalar(0))
        .float();
    let in_cols = (cols.clone() - bound(|b| b.x1))
        .greater_equal_scalar(0)
        .bool_and((cols - bound(|b| b.x2)).lower_scalar(0))
        .float();
    in_rows * in_cols
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_is_one_exactly_inside_each_box() {
        let device = Device::flex();
        let boxes = [
            CutBox {
                y1: 1,
                y2: 3,
                x1: 0,
                x2: 4,
            },
            CutBox {
                y1: 0,
                y2: 0,
                x1: 2,
                x2: 3,
            },
            CutBox {
                y1: 4,
                y2: 5,
                x1: 5,
                x2: 6,
            },
        ];
        let mask: Vec<f32> = box_masks(&boxes, 5, 6, &device)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        for (i, b) in boxes.iter().enumerate() {
            for y in 0..5 {
                for x in 0..6 {
                    let inside = (b.y1..b.y2).contains(&y) && (b.x1..b.x2).contains(&x);
                    assert_eq!(mask[(i * 5 + y) * 6 + x], f32::from(u8::from(inside)));
                }
            }
        }
    }
}
