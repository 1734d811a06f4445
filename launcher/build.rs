include!("link_torch_cuda.rs");

fn main() {
    link_torch_cuda();
}
