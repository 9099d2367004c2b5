fn main() {
    let dev = tch::Device::cuda_if_available();
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_device(dev) * 2.0;
    println!("wdro-worker smoke: {:?} on {:?}", Vec::<f32>::try_from(&t).unwrap(), dev);
}
