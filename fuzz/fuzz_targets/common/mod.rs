//! Checks shared by the import targets.
use bitlinear::PackedTernary;
use candle_core::{Device, Tensor};
use convert::raw::Converted;

/// Every layer `L` of an imported packed model (`L.weight.packed`, `L.weight.scale`, metadata
/// `L.in_features`) rebuilds as a [`PackedTernary`] that unpacks, and the model serializes.
pub fn check_packed<R>(c: &Converted<R>) {
    for (name, t) in &c.tensors {
        let Some(layer) = name.strip_suffix(".weight.packed") else {
            continue;
        };
        let k: usize = c.metadata[&format!("{layer}.in_features")].parse().unwrap();
        let (_, scale) = c
            .tensors
            .iter()
            .find(|(n, _)| *n == format!("{layer}.weight.scale"))
            .unwrap();
        let scale = scale.to_f32().unwrap();
        assert_eq!(scale.len(), 1);
        let bytes = Tensor::from_vec(t.data.clone(), (t.shape[0], t.shape[1]), &Device::Cpu).unwrap();
        let p = PackedTernary::from_parts(bytes, scale[0], k).expect("an imported layer rebuilds");
        assert_eq!(p.unpack().unwrap().len(), t.shape[0] * k);
    }
    let views: Vec<_> = c
        .tensors
        .iter()
        .map(|(n, t)| {
            (
                n.as_str(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, Some(c.metadata.clone())).expect("an imported model serializes");
}
