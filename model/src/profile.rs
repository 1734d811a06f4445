//! Where a step's time goes: device-synchronised intervals, summed by name, collected on this
//! thread between `start` and `finish`. Each `mark` ends the interval since the previous one
//! (or `start`) and charges it to its name; the tape marks every segment's forward and backward
//! (`Tape::set_label`), the fused attention its stages inside. Waiting for the device at every
//! mark makes a profiled run slower than a real one: the shares are for diagnosis.

use std::cell::RefCell;
use std::time::Instant;

use tch::Device;

struct Profile {
    device: Device,
    last: Instant,
    /// (name, milliseconds, intervals), in the order names first appeared.
    totals: Vec<(String, f64, usize)>,
}

thread_local! {
    static PROFILE: RefCell<Option<Profile>> = const { RefCell::new(None) };
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Start collecting on this thread (after the device has drained).
pub fn start(device: Device) {
    sync(device);
    PROFILE.with(|p| {
        *p.borrow_mut() = Some(Profile {
            device,
            last: Instant::now(),
            totals: Vec::new(),
        })
    });
}

/// End the current interval (after the device has drained) and charge it to `name`; nothing
/// unless collecting.
pub fn mark(name: impl FnOnce() -> String) {
    PROFILE.with(|p| {
        if let Some(p) = p.borrow_mut().as_mut() {
            sync(p.device);
            let ms = p.last.elapsed().as_secs_f64() * 1e3;
            let name = name();
            match p.totals.iter_mut().find(|(n, _, _)| *n == name) {
                Some(t) => {
                    t.1 += ms;
                    t.2 += 1;
                }
                None => p.totals.push((name, ms, 1)),
            }
            p.last = Instant::now();
        }
    });
}

/// Stop collecting: (name, milliseconds, intervals) in the order names first appeared.
pub fn finish() -> Vec<(String, f64, usize)> {
    PROFILE
        .with(|p| p.borrow_mut().take())
        .map(|p| p.totals)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_summed_by_name_only_while_collecting() {
        mark(|| panic!("not collecting: the name is not even made"));
        start(Device::Cpu);
        std::thread::sleep(std::time::Duration::from_millis(20));
        mark(|| "a".into());
        mark(|| "b".into());
        std::thread::sleep(std::time::Duration::from_millis(20));
        mark(|| "a".into());
        let t = finish();
        assert_eq!(
            t.iter().map(|(n, _, c)| (n.as_str(), *c)).collect::<Vec<_>>(),
            [("a", 2), ("b", 1)]
        );
        assert!(t[0].1 >= 40.0 && t[1].1 < 20.0, "{t:?}");
        assert!(finish().is_empty());
    }
}
