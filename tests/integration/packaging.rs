//! The board packages' systemd units (edgeact-<board>.edgeact.service, rendered by
//! scripts/render-units from packaging/edgeact.service.in, as scripts/package does) agree
//! with the board configs, and every board has a cargo-deb variant.

use crate::testkit::root;

fn unit_value<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn units_carry_the_board_budget_and_the_hardening() {
    let cargo: toml::Value =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap()).unwrap();
    let variants = &cargo["package"]["metadata"]["deb"]["variants"];
    let units = tempfile::tempdir().unwrap();
    let rendered = std::process::Command::new(root().join("scripts/render-units"))
        .arg(units.path())
        .status()
        .expect("run scripts/render-units");
    assert!(rendered.success(), "scripts/render-units failed");
    for board in ["rpi4", "rpi5", "jetson-orin-nano"] {
        let cfg: toml::Value = toml::from_str(
            &std::fs::read_to_string(root().join(format!("board-configs/{board}.toml"))).unwrap(),
        )
        .unwrap();
        let budget_mib = cfg["memory_budget_mib"].as_integer().unwrap();
        let path = units
            .path()
            .join(format!("edgeact-{board}.edgeact.service"));
        let unit = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (not rendered)", path.display()));
        assert_eq!(
            unit_value(&unit, "MemoryHigh"),
            [format!("{budget_mib}M")],
            "{board}"
        );
        assert_eq!(
            unit_value(&unit, "MemoryMax"),
            [format!("{}M", budget_mib * 5 / 4)],
            "{board}"
        );
        for (key, want) in [
            ("Restart", "on-failure"),
            ("User", "edgeact"),
            ("ProtectSystem", "strict"),
            ("StateDirectory", "edgeact edgeact/outbox"),
            ("Environment", "EDGEACT_STATE_DIR=/var/lib/edgeact/outbox"),
            ("Environment", "EDGEACT_BOARD=/etc/edgeact/board.toml"),
        ] {
            assert!(
                unit_value(&unit, key).contains(&want),
                "{board}: no {key}={want}"
            );
        }
        let assets = variants[board]["merge-assets"]["append"]
            .as_array()
            .unwrap();
        assert!(
            assets.iter().any(
                |a| a[0].as_str() == Some(&format!("board-configs/{board}.toml"))
                    && a[1].as_str() == Some("etc/edgeact/board.toml")
            ),
            "variant {board} does not install its board config"
        );
    }
}
