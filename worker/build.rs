include!("../launcher/build.rs");
