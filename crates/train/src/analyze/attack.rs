//! Input perturbations along the sign of the loss gradient: FGSM (Goodfellow et al. 2015, the
//! paper's Table 11) and ODIN's input preprocessing (Liang et al. 2018). Both step in pixel
//! units (an image's values in [0, 1], before normalisation): FGSM by `+eps` with the result
//! clipped to valid pixels, ODIN by `-eps` unclipped, as its code does. The gradient comes
//! from the model in evaluation mode (running BatchNorm statistics) on an autodiff device.

use burn::module::Module;
use burn::tensor::loss::cross_entropy_with_logits;
use burn::tensor::{Device, Tensor, TensorData};

use cutmix_augment::one_hot;
use cutmix_models::Model;

use super::host;

/// The model, frozen (evaluation BatchNorm, no parameter gradients), on an autodiff device.
pub struct Attacker {
    model: Model,
    device: Device,
    classes: usize,
}

impl Attacker {
    /// `model` must live on an autodiff device (the gradient with respect to the input needs
    /// one).
    pub fn new(model: &Model, classes: usize) -> Self {
        let device = model.classifier().weight.val().device();
        assert!(
            device.is_autodiff(),
            "the attacker needs an autodiff device"
        );
        Self {
            model: model.clone().freeze(),
            device,
            classes,
        }
    }

    /// The sign (-1, 0 or 1) of the gradient of the mean cross-entropy of
    /// `logits / temperature` with respect to the images (also its sign in pixel units, since
    /// normalisation divides by a positive standard deviation), against targets chosen from the
    /// images' `[n][classes]` logits (FGSM: the true labels; ODIN: the predicted classes); and
    /// those logits. One forward pass serves the prediction, the targets and the gradient.
    pub fn gradient_sign_for(
        &self,
        batch: Images,
        targets: impl FnOnce(&[f32]) -> Vec<usize>,
        temperature: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let Images { images, n, size } = batch;
        let input = Tensor::<4>::from_data(
            TensorData::new(images.to_vec(), [n, 3, size, size]),
            &self.device,
        )
        .require_grad();
        let logits =
            cutmix_kernels::on_cpu_threads(&self.device, || self.model.forward(input.clone()));
        let values = host(logits.clone());
        let targets = one_hot(&targets(&values), self.classes, &self.device);
        let loss = cross_entropy_with_logits(logits.div_scalar(temperature), targets);
        let grads = cutmix_kernels::on_cpu_threads(&self.device, || loss.backward());
        let gradient = input
            .grad(&grads)
            .expect("the input takes part in the loss");
        (host(gradient.sign()), values)
    }
}

/// A batch of `n` normalised `[3][size][size]` images.
#[derive(Clone, Copy, Debug)]
pub struct Images<'a> {
    pub images: &'a [f32],
    pub n: usize,
    pub size: usize,
}

/// How a perturbation steps.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// Pixel units: `+eps` ascends the loss (FGSM), `-eps` descends it (ODIN).
    pub eps: f32,
    /// Clip the stepped pixels to [0, 1] (FGSM) or not (ODIN).
    pub clip: bool,
}

/// `images` (normalised, `[n][3][size][size]`) stepped by `step` along `sign` in pixel
/// units: `normalise(clip(pixels + eps * sign))`.
pub fn stepped(
    images: &[f32],
    sign: &[f32],
    size: usize,
    step: Step,
    mean: [f32; 3],
    std: [f32; 3],
) -> Vec<f32> {
    assert_eq!(images.len(), sign.len(), "a sign per value");
    let plane = size * size;
    images
        .chunks_exact(plane)
        .zip(sign.chunks_exact(plane))
        .enumerate()
        .flat_map(|(k, (x, s))| {
            let (m, d) = (mean[k % 3], std[k % 3]);
            x.iter().zip(s).map(move |(&x, &s)| {
                let pixel = x * d + m + step.eps * s;
                let pixel = if step.clip {
                    pixel.clamp(0.0, 1.0)
                } else {
                    pixel
                };
                (pixel - m) / d
            })
        })
        .collect()
}

/// FGSM's top-1 accuracy (a fraction) at each `eps`, and without the attack.
#[derive(Clone, Debug, PartialEq)]
pub struct FgsmSweep {
    pub images: usize,
    pub clean_acc: f64,
    pub acc: Vec<f64>,
}

/// FGSM with the true labels at every `eps` (pixel units) over the images of `loader`: one
/// forward and backward pass per batch (its logits are the clean ones), then one forward pass
/// per `eps`.
pub fn fgsm_sweep(
    subject: &super::Subject,
    attacker: &Attacker,
    loader: &cutmix_data::Loader,
    eps: &[f32],
) -> anyhow::Result<FgsmSweep> {
    let mut right = vec![0usize; eps.len()];
    let (mut clean, mut images) = (0, 0);
    super::each_batch(loader, "FGSM", |batch| {
        let (n, size) = (batch.len(), batch.size);
        let classes = subject.classes;
        let count = |logits: &[f32]| n - super::top1_wrong(logits, classes, &batch.labels);
        let input = Images {
            images: &batch.images,
            n,
            size,
        };
        let (sign, logits) = attacker.gradient_sign_for(input, |_| batch.labels.clone(), 1.0);
        clean += count(&logits);
        for (e, hits) in eps.iter().zip(&mut right) {
            let step = Step {
                eps: *e,
                clip: true,
            };
            let adversarial = stepped(&batch.images, &sign, size, step, subject.mean, subject.std);
            *hits += count(&subject.logits(adversarial, n, size));
        }
        images += n;
        Ok(())
    })?;
    let fraction = |k: usize| k as f64 / images.max(1) as f64;
    Ok(FgsmSweep {
        images,
        clean_acc: fraction(clean),
        acc: right.into_iter().map(fraction).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_in_pixel_units_and_clipped_when_asked() {
        let (mean, std) = ([0.5, 0.25, 0.0], [0.5, 0.25, 1.0]);
        // One 1x1 image: pixels 0.9, 0.5, 0.0 (normalised 0.8, 1.0, 0.0).
        let images = [0.8, 1.0, 0.0];
        let sign = [1.0, -1.0, -1.0];
        let up = stepped(
            &images,
            &sign,
            1,
            Step {
                eps: 0.2,
                clip: true,
            },
            mean,
            std,
        );
        // 0.9 + 0.2 -> 1.0 (clipped); 0.5 - 0.2 = 0.3; 0.0 - 0.2 -> 0.0 (clipped).
        let want = [(1.0 - 0.5) / 0.5, (0.3 - 0.25) / 0.25, 0.0];
        for (got, want) in up.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{up:?}");
        }
        let free = stepped(
            &images,
            &sign,
            1,
            Step {
                eps: 0.2,
                clip: false,
            },
            mean,
            std,
        );
        assert!((free[0] - (1.1 - 0.5) / 0.5).abs() < 1e-6 && (free[2] + 0.2).abs() < 1e-6);
    }
}
