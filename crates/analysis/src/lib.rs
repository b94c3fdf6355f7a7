//! The paper's evaluations beyond accuracy, on plain `f32` slices (no Burn types), so each is
//! checked directly against PyTorch / NumPy numbers:
//!
//! - [`cam`]: class activation maps (Zhou et al. 2016) from a network's last feature map and
//!   its classifier, upsampled to the input and min-max normalised;
//! - [`boxes`]: boxes in pixel coordinates, IoU with the inclusive (+1 pixel) convention, and
//!   boxes from a map (threshold, 8-connected components, tight boxes);
//! - [`localization`]: the localization metrics of the paper (top-1 localization, GT-known
//!   localization) and of wsolevaluation (MaxBoxAcc, MaxBoxAccV2), accumulated image by image;
//! - [`ood`]: out-of-distribution detection from scores (exact ROC with ties, AUROC, TNR at TPR
//!   95%, detection accuracy, AUPR-in / AUPR-out), checked against scikit-learn;
//! - [`calibration`]: ECE, NLL, Brier score, reliability bins and temperature scaling.

pub mod boxes;
pub mod calibration;
pub mod cam;
pub mod localization;
pub mod ood;
