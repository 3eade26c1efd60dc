//! The SMAP data set on disk: `<data>/<split>/<channel>.npy` (float32
//! `[rows, features]`: column 0 the telemetry value, the others the channel's
//! command columns; 25 in all for SMAP) and `<data>/labeled_anomalies.csv`.
//!
//! A channel's width is not fixed here: it is its model's (the input `dims`
//! of its `config.pbtxt`), and data of another width is refused.

use std::path::{Path, PathBuf};

use ndarray::Array2;

/// One channel's split, row-major `[rows, features]`.
pub struct ChannelData {
    pub channel: String,
    pub values: Array2<f32>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct DataError {
    pub path: PathBuf,
    pub reason: String,
}

impl DataError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        "data"
    }
}

pub fn split_path(data: &Path, split: &str, channel: &str) -> PathBuf {
    data.join(split).join(format!("{channel}.npy"))
}

/// Loads one channel's split, checking it has `features` columns (the width
/// of the channel's model).
pub fn load_channel(
    data: &Path,
    split: &str,
    channel: &str,
    features: usize,
) -> Result<ChannelData, DataError> {
    let path = split_path(data, split, channel);
    let values: Array2<f32> = ndarray_npy::read_npy(&path).map_err(|err| DataError {
        path: path.clone(),
        reason: format!("cannot read as float32 [rows, features] .npy: {err}"),
    })?;
    if values.ncols() != features {
        return Err(DataError {
            path,
            reason: width_mismatch(channel, values.ncols(), features),
        });
    }
    let values = if values.is_standard_layout() {
        values
    } else {
        values.as_standard_layout().to_owned()
    };
    Ok(ChannelData {
        channel: channel.to_owned(),
        values,
    })
}

/// Why a channel's data of width `data` cannot go to its model of width `model`.
fn width_mismatch(channel: &str, data: usize, model: usize) -> String {
    format!(
        "channel {channel} has {data} values per row, but its model takes {model} \
         (the input dims in its config.pbtxt): train the channel's model on data of this \
         width (training/train.py), or give it data of the model's width"
    )
}

/// Labelled anomalous ranges of one channel: `[start, end)` row indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    pub channel: String,
    pub ranges: Vec<(u64, u64)>,
    pub rows: u64,
}

/// Parses `labeled_anomalies.csv` (chan_id, spacecraft, anomaly_sequences, class, num_values).
pub fn load_labels(path: &Path) -> Result<Vec<Labels>, DataError> {
    let fail = |reason: String| DataError {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let mut labels = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let at = |reason: &str| fail(format!("line {}: {reason}", i + 1));
        let channel = line
            .split(',')
            .next()
            .ok_or_else(|| at("no channel"))?
            .to_owned();
        let open = line
            .find("\"[[")
            .ok_or_else(|| at("no anomaly_sequences"))?;
        let close = line[open..]
            .find("]]\"")
            .ok_or_else(|| at("unterminated anomaly_sequences"))?
            + open;
        let ranges_text = &line[open + 3..close];
        let mut ranges = Vec::new();
        for pair in ranges_text.split("], [") {
            let mut bounds = pair.split(',').map(|v| v.trim().parse::<u64>());
            match (bounds.next(), bounds.next(), bounds.next()) {
                (Some(Ok(start)), Some(Ok(end)), None) if start < end => ranges.push((start, end)),
                _ => return Err(at(&format!("bad range \"{pair}\""))),
            }
        }
        ranges.sort_unstable();
        let rows = line
            .rsplit(',')
            .next()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| at("bad num_values"))?;
        labels.push(Labels {
            channel,
            ranges,
            rows,
        });
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_split(data: &Path, split: &str, channel: &str, rows: usize, features: usize) {
        let values = Array2::<f32>::from_shape_fn((rows, features), |(r, f)| (r * f) as f32);
        std::fs::create_dir_all(data.join(split)).unwrap();
        ndarray_npy::write_npy(split_path(data, split, channel), &values).unwrap();
    }

    #[test]
    fn loads_a_channel_of_any_width_its_model_takes() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), "test", "M-1", 7, 55);
        let loaded = load_channel(dir.path(), "test", "M-1", 55).unwrap();
        assert_eq!(loaded.values.dim(), (7, 55));
        assert_eq!(loaded.values[[6, 54]], (6 * 54) as f32);
    }

    #[test]
    fn refuses_data_wider_than_the_channel_model_naming_channel_and_both_widths() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), "test", "A-1", 3, 55);
        let err = load_channel(dir.path(), "test", "A-1", 25)
            .err()
            .expect("55-wide data cannot go to a 25-wide model");
        let message = err.to_string();
        assert!(
            message.contains("test/A-1.npy")
                && message.contains("channel A-1 has 55 values per row, but its model takes 25"),
            "{message}"
        );
    }

    #[test]
    fn refuses_data_narrower_than_the_channel_model() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), "train", "M-1", 3, 25);
        let message = load_channel(dir.path(), "train", "M-1", 55)
            .err()
            .expect("25-wide data cannot go to a 55-wide model")
            .to_string();
        assert!(
            message.contains("channel M-1 has 25 values per row, but its model takes 55"),
            "{message}"
        );
    }

    #[test]
    fn parses_the_smap_label_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.csv");
        std::fs::write(
            &path,
            "chan_id,spacecraft,anomaly_sequences,class,num_values\n\
             P-1,SMAP,\"[[2149, 2349], [4536, 4844], [3539, 3779]]\",\"[contextual, contextual, contextual]\",8505\n\
             A-1,SMAP,\"[[4690, 4774]]\",[point],8640\n",
        )
        .unwrap();
        let labels = load_labels(&path).unwrap();
        assert_eq!(
            labels[0].ranges,
            vec![(2149, 2349), (3539, 3779), (4536, 4844)]
        );
        assert_eq!(
            labels[1],
            Labels {
                channel: "A-1".into(),
                ranges: vec![(4690, 4774)],
                rows: 8640
            }
        );
    }
}
