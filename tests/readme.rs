//! The README's architecture table must be exactly the architecture table in code, and every
//! fixture it cites must have a parity test.

use moe_models::ARCHITECTURES;

#[test]
fn readme_architecture_table_matches_code_and_tests() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let start = readme
        .find("<!-- architectures:start -->")
        .expect("start marker");
    let end = readme
        .find("<!-- architectures:end -->")
        .expect("end marker");
    let rows: Vec<(String, String)> = readme[start..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells[0].trim_matches('`').to_string(), cells[1].to_string())
        })
        .collect();
    let expected: Vec<(String, String)> = ARCHITECTURES
        .iter()
        .map(|a| (a.hf_class.to_string(), a.verified_by.join(", ")))
        .collect();
    assert_eq!(
        rows, expected,
        "README architecture table differs from moe_models::ARCHITECTURES"
    );

    let parity = std::fs::read_to_string(format!("{root}/tests/parity.rs")).unwrap();
    for arch in ARCHITECTURES {
        for fixture in arch.verified_by {
            assert!(
                parity.contains(&format!("check_fixture(\"{fixture}\"")),
                "{fixture} has no parity test"
            );
            assert!(
                moe_tests::fixture_dir(fixture)
                    .join("reference.json")
                    .exists(),
                "{fixture} missing"
            );
        }
    }
}
