use std::io::{self, Read};

use super::reader::parse_size;
use super::writer::header;
use super::*;
use crate::digest::OciDigest;
use crate::verity::verity_digest;

fn objects(n: usize) -> Vec<(VerityDigest, Vec<u8>)> {
    let mut v: Vec<_> = (0..n)
        .map(|i| {
            let data: Vec<u8> = (0..(i * 1000 + 65)).map(|j| (i + j) as u8).collect();
            (verity_digest(&data), data)
        })
        .collect();
    v.sort_by_key(|(d, _)| *d);
    v
}

fn pack_of(objs: &[(VerityDigest, Vec<u8>)]) -> Vec<u8> {
    let mut w = PackWriter::new(Vec::new());
    for (d, data) in objs {
        w.add(*d, data.len() as u64, &mut data.as_slice()).unwrap();
    }
    w.finish().unwrap().0
}

fn read_all(pack: &[u8]) -> Result<Vec<(VerityDigest, Vec<u8>)>, PackError> {
    let mut r = PackReader::new(pack);
    let mut out = Vec::new();
    while let Some(mut obj) = r.next_object()? {
        let d = obj.digest();
        let mut data = Vec::new();
        obj.read_to_end(&mut data)?;
        out.push((d, data));
    }
    Ok(out)
}

/// A header with `edit` applied to its raw bytes and the checksum recomputed.
fn edited_header(name: &VerityDigest, size: u64, edit: impl FnOnce(&mut [u8; BLOCK])) -> [u8; BLOCK] {
    let mut h = header(name, size);
    edit(&mut h);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

fn stream(entries: &[([u8; BLOCK], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (h, data) in entries {
        out.extend_from_slice(h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }
    out.extend_from_slice(&[0u8; 2 * BLOCK]);
    out
}

#[test]
fn round_trip_and_totals() {
    let objs = objects(5);
    let pack = pack_of(&objs);
    let mut r = PackReader::new(pack.as_slice());
    let mut n = 0;
    while let Some(mut o) = r.next_object().unwrap() {
        io::copy(&mut o, &mut io::sink()).unwrap();
        n += 1;
    }
    assert_eq!(n, 5);
    let bytes: u64 = objs.iter().map(|(_, d)| d.len() as u64).sum();
    r.check_totals(5, bytes).unwrap();
    assert!(matches!(r.check_totals(4, bytes), Err(PackError::Totals { what: "objects", .. })));
    assert!(matches!(r.check_totals(5, bytes + 1), Err(PackError::Totals { what: "object bytes", .. })));
    assert_eq!(read_all(&pack).unwrap(), objs);
}

#[test]
fn unread_objects_are_still_verified() {
    let objs = objects(2);
    let mut pack = pack_of(&objs);
    pack[BLOCK + 3] ^= 1; // first object's data
    let mut r = PackReader::new(pack.as_slice());
    // Take the first object without reading it.
    assert!(r.next_object().unwrap().is_some());
    let err = r.next_object().unwrap_err();
    assert!(matches!(err, PackError::DigestMismatch { .. }), "{err}");
}

#[test]
fn every_non_regular_kind_is_refused_by_name() {
    let (d, _) = objects(1).remove(0);
    for (flag, kind) in [
        (b'1', "hard link"),
        (b'2', "symbolic link"),
        (b'3', "character device"),
        (b'4', "block device"),
        (b'5', "directory"),
        (b'6', "fifo"),
        (b'x', "pax extended header"),
        (b'L', "GNU long name"),
    ] {
        let h = edited_header(&d, 0, |h| h[156] = flag);
        let err = read_all(&stream(&[(h, &[])])).unwrap_err();
        match err {
            PackError::NotRegular { name, kind: k } => {
                assert_eq!(k, kind);
                assert_eq!(name, d.hex());
            }
            other => panic!("{kind}: {other}"),
        }
    }
}

#[test]
fn bad_names_are_refused() {
    let (d, data) = objects(1).remove(0);
    let names: [&[u8]; 6] = [b"/", b"..", b"../../etc/passwd", b"/abs", b"ab/cd", b"ABCDEF"];
    for name in names {
        let h = edited_header(&d, data.len() as u64, |h| {
            h[..100].fill(0);
            h[..name.len()].copy_from_slice(name);
        });
        let err = read_all(&stream(&[(h, &data)])).unwrap_err();
        assert!(matches!(err, PackError::BadName { .. }), "{name:?}: {err}");
        assert!(err.to_string().contains(&String::from_utf8_lossy(name).to_string()), "{err}");
    }
    let h = edited_header(&d, data.len() as u64, |h| h[345..348].copy_from_slice(b"dir"));
    assert!(matches!(read_all(&stream(&[(h, &data)])), Err(PackError::BadName { .. })));
    let h = edited_header(&d, 0, |h| h[157..161].copy_from_slice(b"/etc"));
    assert!(matches!(read_all(&stream(&[(h, &[])])), Err(PackError::NotRegular { kind: "link", .. })));
}

#[test]
fn duplicates_and_disorder() {
    let objs = objects(2);
    let h0 = header(&objs[0].0, objs[0].1.len() as u64);
    let h1 = header(&objs[1].0, objs[1].1.len() as u64);
    let dup = stream(&[(h0, &objs[0].1), (h0, &objs[0].1)]);
    assert!(matches!(read_all(&dup), Err(PackError::Duplicate { .. })));
    let swapped = stream(&[(h1, &objs[1].1), (h0, &objs[0].1)]);
    assert!(matches!(read_all(&swapped), Err(PackError::OutOfOrder { .. })));
}

#[test]
fn sizes_that_disagree_with_the_data() {
    let (d, data) = objects(1).remove(0);
    // Header claims more bytes than the stream holds.
    let mut s = header(&d, data.len() as u64 + 10_000).to_vec();
    s.extend_from_slice(&data);
    let err = read_all(&s).unwrap_err();
    assert!(matches!(err, PackError::Truncated { .. }), "{err}");
    // Header claims fewer bytes: the digest no longer matches.
    let h = header(&d, data.len() as u64 - 1);
    let err = read_all(&stream(&[(h, &data[..data.len() - 1])])).unwrap_err();
    assert!(matches!(err, PackError::DigestMismatch { .. }), "{err}");
    // Size field that is not octal.
    let h = edited_header(&d, 0, |h| h[124..136].copy_from_slice(b"00000000009\0"));
    assert!(matches!(read_all(&stream(&[(h, &[])])), Err(PackError::Header { .. })));
}

#[test]
fn content_that_does_not_match_its_name() {
    let objs = objects(1);
    let mut pack = pack_of(&objs);
    pack[BLOCK] ^= 0xff;
    let err = read_all(&pack).unwrap_err();
    assert!(matches!(err, PackError::DigestMismatch { name, .. } if name == objs[0].0), "{err}");
}

#[test]
fn framing_errors() {
    let objs = objects(1);
    let pack = pack_of(&objs);
    let mut trailing = pack.clone();
    trailing.extend_from_slice(b"junk");
    assert!(matches!(read_all(&trailing), Err(PackError::TrailingGarbage(4))));
    let cut = &pack[..pack.len() - BLOCK];
    assert!(matches!(read_all(cut), Err(PackError::NoEndMarker)));
    assert!(matches!(read_all(&[]), Err(PackError::NoEndMarker)));
    let mut bad_sum = pack.clone();
    bad_sum[150] = b'7';
    assert!(matches!(read_all(&bad_sum), Err(PackError::Header { .. })));
    let gnu = edited_header(&objs[0].0, 0, |h| h[257..265].copy_from_slice(b"ustar  \0"));
    assert!(matches!(read_all(&stream(&[(gnu, &[])])), Err(PackError::Header { .. })));
    let mut bad_pad = pack;
    let pad_at = BLOCK + objs[0].1.len();
    bad_pad[pad_at] = 1;
    assert!(matches!(read_all(&bad_pad), Err(PackError::Padding { .. })));
}

#[test]
fn large_sizes_use_base256() {
    let d = VerityDigest::new([9; 32]);
    let h = header(&d, OCTAL_MAX + 1);
    assert_eq!(parse_size(&h[124..136]), Some(OCTAL_MAX + 1));
    let h = header(&d, OCTAL_MAX);
    assert_eq!(parse_size(&h[124..136]), Some(OCTAL_MAX));
}

#[test]
fn empty_pack_is_valid() {
    assert!(read_all(&pack_of(&[])).unwrap().is_empty());
}

#[test]
fn a_base_256_marker_in_the_checksum_field_is_an_error_not_a_panic() {
    // Regression from `just fuzz` (pack_reader): the 8-byte checksum field read as base-256.
    let objs = objects(1);
    let mut h = header(&objs[0].0, objs[0].1.len() as u64);
    h[148] = 0x80;
    let err = read_all(&stream(&[(h, &objs[0].1)])).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn a_kernel_checked_reader_leaves_the_digest_to_its_caller_and_checks_everything_else() {
    let objs = objects(3);
    let mut pack = pack_of(&objs);
    pack[BLOCK] ^= 0xff;
    // The changed bytes come through under their (now wrong) name: the caller's kernel
    // measurement is what refuses them (oci's unpacker, tested in the QEMU tier).
    let mut r = PackReader::kernel_checked(pack.as_slice());
    let mut got = Vec::new();
    while let Some(mut obj) = r.next_object().unwrap() {
        let mut data = Vec::new();
        obj.read_to_end(&mut data).unwrap();
        got.push((obj.digest(), data));
    }
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].0, objs[0].0);
    assert_ne!(verity_digest(&got[0].1), got[0].0);
    assert_eq!(r.totals(), (3, objs.iter().map(|(_, d)| d.len() as u64).sum()));

    // Framing, names, order, sizes and padding are still the reader's.
    let mut trailing = pack_of(&objs);
    trailing.extend_from_slice(b"junk");
    let mut r = PackReader::kernel_checked(trailing.as_slice());
    let err = loop {
        match r.next_object() {
            Ok(Some(mut obj)) => drop(obj.read_to_end(&mut Vec::new())),
            Ok(None) => panic!("trailing bytes accepted"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, PackError::TrailingGarbage(4)), "{err}");
    let (d, data) = objects(1).remove(0);
    let mut s = header(&d, data.len() as u64 + 10_000).to_vec();
    s.extend_from_slice(&data);
    let mut r = PackReader::kernel_checked(s.as_slice());
    let mut obj = r.next_object().unwrap().unwrap();
    assert!(obj.read_to_end(&mut Vec::new()).is_err(), "a truncated object is still refused");
}

/// Hands out at most `step` bytes per read, like a network stream.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn the_blob_digest_covers_every_byte_of_the_pack_whatever_the_reads_and_the_mode() {
    use sha2::Digest as _;
    let mut objs: Vec<_> = [4096 * 3, 4096 * 2 + 1, 10, 0, 70_000]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let data: Vec<u8> = (0..n).map(|j| (i * 31 + j * 7) as u8).collect();
            (verity_digest(&data), data)
        })
        .collect();
    objs.sort_by_key(|(d, _)| *d);
    let pack = pack_of(&objs);
    let expected = OciDigest::new(sha2::Sha256::digest(&pack).into());
    for step in [1, 700, 4096, 1 << 20] {
        for kernel in [false, true] {
            for read_objects in [true, false] {
                let input = Trickle { data: &pack, step };
                let reader = if kernel { PackReader::kernel_checked(input) } else { PackReader::new(input) };
                let mut r = reader.with_blob_digest();
                let mut n = 0;
                while let Some(mut obj) = r.next_object().unwrap() {
                    if read_objects {
                        io::copy(&mut obj, &mut io::sink()).unwrap();
                    }
                    n += 1;
                    assert_eq!(r.blob_digest(), None, "no digest before the end");
                }
                assert_eq!(n, objs.len());
                assert_eq!(r.blob_digest(), Some(expected), "reads of {step}, kernel {kernel}, read {read_objects}");
            }
        }
    }
    let mut plain = PackReader::new(pack.as_slice());
    while plain.next_object().unwrap().is_some() {}
    assert_eq!(plain.blob_digest(), None, "not asked for");
}
