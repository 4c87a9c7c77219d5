//! Rows of a schema as bytes, for state that stores whole rows only to compare them for
//! equality and give them back (TopN's rows): each column's value after a flag byte,
//! fixed-width values as their little-endian bytes, strings and binaries after their
//! length. Unlike arrow's row format it does not order rows, so encoding and decoding
//! are copies: arrow-row's order-preserving strings (32-byte blocks, each with a
//! continuation byte) made decoding TopN's emitted rows a fifth of q18's time. A null is
//! its flag alone, so equal rows have equal bytes.
//!
//! Schemas with other column types (lists, structs, dictionaries, views) use arrow's row
//! format ([`RowCodec::Arrow`]).

use datafusion::arrow::array::{make_array, Array, ArrayData, ArrayRef, BooleanBufferBuilder};
use datafusion::arrow::buffer::{BooleanBuffer, Buffer, NullBuffer};
use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::arrow::row::{RowConverter, Rows};
use datafusion::common::{DataFusionError, Result};

/// How a column is laid out in a row.
#[derive(Clone, Copy)]
enum Layout {
    /// Little-endian values of this many bytes.
    Fixed(usize),
    Bool,
    /// Variable-length, with i32 offsets (Utf8, Binary) or i64 ones (the Large types).
    Bytes {
        large: bool,
    },
}

fn layout(data_type: &DataType) -> Option<Layout> {
    match data_type {
        DataType::Boolean => Some(Layout::Bool),
        DataType::Utf8 | DataType::Binary => Some(Layout::Bytes { large: false }),
        DataType::LargeUtf8 | DataType::LargeBinary => Some(Layout::Bytes { large: true }),
        t if t.is_primitive() => t.primitive_width().map(Layout::Fixed),
        _ => None,
    }
}

/// Flag bytes: a null, a value (and, for booleans, which one).
const NULL: u8 = 0;
const VALUE: u8 = 1;
const TRUE: u8 = 2;

/// The codec of rows of some fields: [`FlatRows`] when every field's type has a flat
/// layout, else arrow's row format.
pub enum RowCodec {
    Flat(FlatRows),
    Arrow(RowConverter),
}

/// Encoded rows, one byte string each.
pub enum EncodedRows {
    Flat { bytes: Vec<u8>, ends: Vec<usize> },
    Arrow(Rows),
}

impl EncodedRows {
    /// Row `i`'s bytes.
    pub fn row(&self, i: usize) -> &[u8] {
        match self {
            EncodedRows::Flat { bytes, ends } => {
                let start = if i == 0 { 0 } else { ends[i - 1] };
                &bytes[start..ends[i]]
            }
            EncodedRows::Arrow(rows) => rows.row(i).data(),
        }
    }
}

impl RowCodec {
    pub fn new(fields: &[FieldRef]) -> Result<Self> {
        match FlatRows::new(fields) {
            Some(flat) => Ok(RowCodec::Flat(flat)),
            None => Ok(RowCodec::Arrow(crate::stream::row_converter(fields)?)),
        }
    }

    /// Whether rows are in the flat layout (not arrow's row format).
    pub fn is_flat(&self) -> bool {
        matches!(self, RowCodec::Flat(_))
    }

    pub fn encode(&self, columns: &[ArrayRef]) -> Result<EncodedRows> {
        match self {
            RowCodec::Flat(flat) => flat.encode(columns),
            RowCodec::Arrow(converter) => {
                Ok(EncodedRows::Arrow(converter.convert_columns(columns)?))
            }
        }
    }

    /// The columns of `rows`, each encoded by this codec.
    pub fn decode<'a>(
        &self,
        rows: impl ExactSizeIterator<Item = &'a [u8]>,
    ) -> Result<Vec<ArrayRef>> {
        match self {
            RowCodec::Flat(flat) => flat.decode(rows),
            RowCodec::Arrow(converter) => {
                let parser = converter.parser();
                Ok(converter.convert_rows(rows.map(|r| parser.parse(r)))?)
            }
        }
    }
}

pub struct FlatRows {
    fields: Vec<FieldRef>,
    layouts: Vec<Layout>,
}

impl FlatRows {
    /// The flat codec of `fields`, if every type has a flat layout.
    pub fn new(fields: &[FieldRef]) -> Option<Self> {
        let layouts = fields
            .iter()
            .map(|f| layout(f.data_type()))
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            fields: fields.to_vec(),
            layouts,
        })
    }

    pub fn encode(&self, columns: &[ArrayRef]) -> Result<EncodedRows> {
        let n = columns.first().map_or(0, |c| c.len());
        let data: Vec<ArrayData> = columns.iter().map(|c| c.to_data()).collect();
        let inputs: Vec<ColumnIn> = data
            .iter()
            .zip(&self.layouts)
            .map(|(d, layout)| ColumnIn::new(d, *layout))
            .collect();
        let size: usize = inputs.iter().map(|c| c.size(n)).sum();
        let mut bytes = Vec::with_capacity(size);
        let mut ends = Vec::with_capacity(n);
        for i in 0..n {
            for column in &inputs {
                column.write(i, &mut bytes);
            }
            ends.push(bytes.len());
        }
        Ok(EncodedRows::Flat { bytes, ends })
    }

    /// The columns of `rows`, a column at a time: each row's cursor moves past the
    /// column's value as it is read (a loop per column and layout, as arrow's row
    /// format decodes; a row at a time with a match per value was slower than it).
    pub fn decode<'a>(
        &self,
        rows: impl ExactSizeIterator<Item = &'a [u8]>,
    ) -> Result<Vec<ArrayRef>> {
        let rows: Vec<&[u8]> = rows.collect();
        let mut cursors = vec![0; rows.len()];
        let columns = self
            .layouts
            .iter()
            .zip(&self.fields)
            .map(|(layout, field)| decode_column(*layout, field.data_type(), &rows, &mut cursors))
            .collect::<Result<Vec<_>>>()?;
        if rows.iter().zip(&cursors).any(|(row, at)| *at != row.len()) {
            return Err(corrupt());
        }
        Ok(columns)
    }
}

/// The column of `layout` at each row's cursor, moving the cursors past it.
fn decode_column(
    layout: Layout,
    data_type: &DataType,
    rows: &[&[u8]],
    cursors: &mut [usize],
) -> Result<ArrayRef> {
    let n = rows.len();
    let mut valid = BooleanBufferBuilder::new(n);
    let builder = ArrayData::builder(data_type.clone()).len(n);
    let builder = match layout {
        Layout::Fixed(width) => {
            // Copies of a width known at compile time for the common ones.
            let values = match width {
                8 => fixed::<8>(rows, cursors, &mut valid)?,
                4 => fixed::<4>(rows, cursors, &mut valid)?,
                16 => fixed::<16>(rows, cursors, &mut valid)?,
                _ => {
                    let mut values = Vec::with_capacity(n * width);
                    for (row, at) in rows.iter().zip(cursors.iter_mut()) {
                        let is_valid = flag(row, at)? != NULL;
                        valid.append(is_valid);
                        if is_valid {
                            values.extend_from_slice(take(row, at, width)?);
                        } else {
                            values.resize(values.len() + width, 0);
                        }
                    }
                    values
                }
            };
            builder.add_buffer(Buffer::from_vec(values))
        }
        Layout::Bool => {
            let mut values = BooleanBufferBuilder::new(n);
            for (row, at) in rows.iter().zip(cursors.iter_mut()) {
                let flag = flag(row, at)?;
                valid.append(flag != NULL);
                values.append(flag == TRUE);
            }
            builder.add_buffer(values.finish().into_inner())
        }
        Layout::Bytes { large } => {
            // The column's bytes first, so that its buffer is sized once.
            let mut total = 0;
            for (row, &at) in rows.iter().zip(cursors.iter()) {
                if *row.get(at).ok_or_else(corrupt)? != NULL {
                    let mut len_at = at + 1;
                    total += length(row, &mut len_at)?;
                }
            }
            let mut values = Vec::with_capacity(total);
            let mut ends = Vec::with_capacity(n + 1);
            ends.push(0usize);
            for (row, at) in rows.iter().zip(cursors.iter_mut()) {
                let is_valid = flag(row, at)? != NULL;
                valid.append(is_valid);
                if is_valid {
                    let len = length(row, at)?;
                    values.extend_from_slice(take(row, at, len)?);
                }
                ends.push(values.len());
            }
            let offsets = if large {
                Buffer::from_vec(ends.iter().map(|&e| e as i64).collect::<Vec<_>>())
            } else {
                let ends = ends
                    .iter()
                    .map(|&e| i32::try_from(e))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| {
                        DataFusionError::Internal("rows whose strings add up to over 2 GiB".into())
                    })?;
                Buffer::from_vec(ends)
            };
            builder
                .add_buffer(offsets)
                .add_buffer(Buffer::from_vec(values))
        }
    };
    let valid = NullBuffer::new(valid.finish());
    let builder = builder.nulls((valid.null_count() > 0).then_some(valid));
    // Validated: a corrupt row fails here instead of making an invalid array.
    Ok(make_array(builder.build()?))
}

/// The bytes of a column of `W`-byte values at the cursors, which move past them.
fn fixed<const W: usize>(
    rows: &[&[u8]],
    cursors: &mut [usize],
    valid: &mut BooleanBufferBuilder,
) -> Result<Vec<u8>> {
    let mut values: Vec<[u8; W]> = Vec::with_capacity(rows.len());
    for (row, at) in rows.iter().zip(cursors.iter_mut()) {
        let is_valid = flag(row, at)? != NULL;
        valid.append(is_valid);
        values.push(if is_valid {
            take(row, at, W)?.try_into().expect("W bytes")
        } else {
            [0; W]
        });
    }
    Ok(values.into_flattened())
}

/// The flag byte at the cursor, which moves past it.
fn flag(row: &[u8], at: &mut usize) -> Result<u8> {
    let flag = *row.get(*at).ok_or_else(corrupt)?;
    *at += 1;
    Ok(flag)
}

/// A value's length at the cursor, which moves past it.
fn length(row: &[u8], at: &mut usize) -> Result<usize> {
    let len = take(row, at, 4)?;
    Ok(u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize)
}

/// `len` bytes at the cursor, which moves past them.
fn take<'a>(row: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8]> {
    let bytes = row.get(*at..*at + len).ok_or_else(corrupt)?;
    *at += len;
    Ok(bytes)
}

/// A column being written: its values where they are in its buffers.
struct ColumnIn<'a> {
    nulls: Option<&'a NullBuffer>,
    values: Values<'a>,
}

enum Values<'a> {
    /// Values from the array's offset on.
    Fixed {
        bytes: &'a [u8],
        width: usize,
    },
    Bool(BooleanBuffer),
    Bytes32 {
        offsets: &'a [i32],
        bytes: &'a [u8],
    },
    Bytes64 {
        offsets: &'a [i64],
        bytes: &'a [u8],
    },
}

impl<'a> ColumnIn<'a> {
    fn new(d: &'a ArrayData, layout: Layout) -> Self {
        let values = match layout {
            Layout::Fixed(width) => Values::Fixed {
                bytes: &d.buffers()[0][d.offset() * width..],
                width,
            },
            Layout::Bool => Values::Bool(BooleanBuffer::new(
                d.buffers()[0].clone(),
                d.offset(),
                d.len(),
            )),
            Layout::Bytes { large: false } => Values::Bytes32 {
                offsets: &d.buffers()[0].typed_data::<i32>()[d.offset()..],
                bytes: d.buffers()[1].as_slice(),
            },
            Layout::Bytes { large: true } => Values::Bytes64 {
                offsets: &d.buffers()[0].typed_data::<i64>()[d.offset()..],
                bytes: d.buffers()[1].as_slice(),
            },
        };
        Self {
            nulls: d.nulls(),
            values,
        }
    }

    /// The bytes `n` rows of this column take at most.
    fn size(&self, n: usize) -> usize {
        n + match &self.values {
            Values::Fixed { width, .. } => n * width,
            Values::Bool(_) => 0,
            Values::Bytes32 { offsets, .. } => 4 * n + (offsets[n] - offsets[0]) as usize,
            Values::Bytes64 { offsets, .. } => 4 * n + (offsets[n] - offsets[0]) as usize,
        }
    }

    /// Appends row `i`'s value.
    fn write(&self, i: usize, out: &mut Vec<u8>) {
        if self.nulls.is_some_and(|n| n.is_null(i)) {
            out.push(NULL);
            return;
        }
        let value = match &self.values {
            Values::Fixed { bytes, width } => {
                out.push(VALUE);
                out.extend_from_slice(&bytes[i * width..(i + 1) * width]);
                return;
            }
            Values::Bool(set) => {
                out.push(if set.value(i) { TRUE } else { VALUE });
                return;
            }
            Values::Bytes32 { offsets, bytes } => {
                &bytes[offsets[i] as usize..offsets[i + 1] as usize]
            }
            Values::Bytes64 { offsets, bytes } => {
                &bytes[offsets[i] as usize..offsets[i + 1] as usize]
            }
        };
        out.push(VALUE);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
}

fn corrupt() -> DataFusionError {
    DataFusionError::Internal("a stored row is cut short or too long".into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use datafusion::arrow::array::{
        BinaryArray, BooleanArray, Decimal128Array, Float64Array, Int16Array, Int32Array,
        LargeStringArray, ListArray, StringArray, TimestampMillisecondArray,
    };
    use datafusion::arrow::datatypes::{Field, Int32Type};

    fn columns() -> Vec<ArrayRef> {
        vec![
            Arc::new(Int32Array::from(vec![Some(1), None, Some(-3), Some(4)])),
            Arc::new(StringArray::from(vec![
                Some("a"),
                Some(""),
                None,
                Some("long text ✓"),
            ])),
            Arc::new(BooleanArray::from(vec![
                Some(true),
                Some(false),
                None,
                Some(true),
            ])),
            Arc::new(Float64Array::from(vec![1.5, -0.0, f64::NAN, 2.0])),
            Arc::new(TimestampMillisecondArray::from(vec![
                Some(1),
                Some(2),
                None,
                Some(3),
            ])),
            Arc::new(
                Decimal128Array::from(vec![Some(12345), None, Some(-1), Some(0)])
                    .with_precision_and_scale(10, 2)
                    .unwrap(),
            ),
            Arc::new(BinaryArray::from(vec![
                Some(&b"\x00\x01"[..]),
                None,
                Some(b""),
                Some(b"x"),
            ])),
            Arc::new(LargeStringArray::from(vec![
                None,
                Some("b"),
                Some("c"),
                None,
            ])),
            // A width copied by the general loop.
            Arc::new(Int16Array::from(vec![Some(7), None, Some(-7), Some(0)])),
        ]
    }

    fn fields(columns: &[ArrayRef]) -> Vec<FieldRef> {
        columns
            .iter()
            .enumerate()
            .map(|(i, c)| Arc::new(Field::new(format!("c{i}"), c.data_type().clone(), true)))
            .collect()
    }

    #[test]
    fn rows_come_back_as_they_went_in_sliced_and_equal_rows_have_equal_bytes() {
        let columns = columns();
        let codec = RowCodec::new(&fields(&columns)).unwrap();
        assert!(codec.is_flat());
        let rows = codec.encode(&columns).unwrap();
        let back = codec.decode((0..4).map(|i| rows.row(i))).unwrap();
        for (a, b) in columns.iter().zip(&back) {
            assert_eq!(a.to_data(), b.to_data());
        }
        // Rows in another order, from sliced arrays (offsets into shared buffers).
        let sliced: Vec<ArrayRef> = columns.iter().map(|c| c.slice(1, 3)).collect();
        let part = codec.encode(&sliced).unwrap();
        for i in 0..3 {
            assert_eq!(part.row(i), rows.row(i + 1));
        }
        let back = codec
            .decode([part.row(2), part.row(0)].into_iter())
            .unwrap();
        for (a, b) in columns.iter().zip(&back) {
            let expected =
                datafusion::arrow::compute::concat(&[&a.slice(3, 1), &a.slice(1, 1)]).unwrap();
            assert_eq!(expected.to_data(), b.to_data());
        }
        // Nulls leave no value bytes: a row of nulls is its flags.
        let nulls: Vec<ArrayRef> = columns
            .iter()
            .map(|c| datafusion::arrow::array::new_null_array(c.data_type(), 1))
            .collect();
        assert_eq!(codec.encode(&nulls).unwrap().row(0), &[NULL; 9]);
    }

    #[test]
    fn cut_rows_are_errors_and_other_types_use_arrows_row_format() {
        let columns = columns();
        let codec = RowCodec::new(&fields(&columns)).unwrap();
        let rows = codec.encode(&columns).unwrap();
        let row = rows.row(3);
        assert!(codec.decode([&row[..row.len() - 1]].into_iter()).is_err());
        let mut longer = row.to_vec();
        longer.push(0);
        assert!(codec.decode([longer.as_slice()].into_iter()).is_err());
        let list: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
            Some(vec![Some(1)]),
            None,
        ]));
        let codec = RowCodec::new(&fields(std::slice::from_ref(&list))).unwrap();
        assert!(!codec.is_flat());
        let rows = codec.encode(std::slice::from_ref(&list)).unwrap();
        let back = codec.decode((0..2).map(|i| rows.row(i))).unwrap();
        assert_eq!(back[0].to_data(), list.to_data());
    }
}
