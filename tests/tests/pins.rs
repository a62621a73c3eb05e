//! Pinned state across agent versions.

use std::{fs, path::Path};

use aya::maps::{Array, MapData, MapInfo};
use dataplane_common::{RevNat, capacity, names};
use wharf_agent::ebpf::Dataplane;
use wharf_tests::fixture::{BPFFS, require_root};

/// A map pinned by a build with another layout is recreated, not reused
/// (reusing it would make the verifier reject the programs).
#[test]
fn a_pinned_map_with_another_layout_is_recreated() {
    require_root();
    let node = format!("test-pins-{}", std::process::id());
    let bpffs = Path::new(BPFFS);
    Dataplane::teardown(bpffs, &node).unwrap();
    let pin_dir = Dataplane::pin_dir(bpffs, &node);
    fs::create_dir_all(&pin_dir).unwrap();
    let stale = pin_dir.join(names::REV_NAT);
    Array::<MapData, u64>::create(4, 0)
        .unwrap()
        .pin(&stale)
        .unwrap();

    let loaded = Dataplane::load(bpffs, &node);
    let info = MapInfo::from_pin(&stale);
    Dataplane::teardown(bpffs, &node).unwrap();

    loaded.expect("loading over an incompatible pin");
    let info = info.unwrap();
    assert_eq!(info.value_size() as usize, size_of::<RevNat>());
    assert_eq!(info.max_entries(), capacity::REV_NAT);
}
