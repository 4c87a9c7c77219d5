//! Responses that last: a subscription's rows sent as they are published (plain rows or
//! COPY text), and waits (FETCH) that may be long. pgwire runs a statement inside its
//! cancel watch only until the handler returns, so these send their messages themselves
//! from inside the handler: a CancelRequest then ends them with 57014.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use datafusion::arrow::record_batch::RecordBatch;
use futures::{Sink, SinkExt};
use pgwire::api::portal::Format;
use pgwire::api::results::{FieldInfo, Response, Tag};
use pgwire::api::ClientInfo;
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::copy::{CopyData, CopyDone, CopyOutResponse};
use pgwire::messages::data::{DataRow, RowDescription};
use pgwire::messages::startup::ParameterStatus;
use pgwire::messages::PgWireBackendMessage;
use pgwire::types::format::FormatOptions;

use crate::sql::error::SqlError;
use crate::sql::session;
use crate::sql::subscribe::Subscription;

/// How often a waiting statement writes to its client. The connection is not read while
/// a statement runs, so a write failing is how a subscription learns its client is gone
/// (and stops its job) rather than waiting for a change that may never come.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Runs `work`, telling the client the server is alive every [`HEARTBEAT`] with a
/// ParameterStatus that repeats a reported value (clients take it at any time, even
/// mid-result or mid-COPY, and nothing changes); fails once the client is gone.
pub async fn with_heartbeat<C, F>(client: &mut C, work: F) -> PgWireResult<F::Output>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    F: Future,
{
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return Ok(out),
            _ = tokio::time::sleep(HEARTBEAT) => {
                let (name, value) = session::show(client.metadata(), "application_name")
                    .unwrap_or_else(|_| ("application_name".into(), String::new()));
                client
                    .send(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(name, value)))
                    .await?;
            }
        }
    }
}

fn user_error(e: SqlError) -> PgWireError {
    PgWireError::UserError(Box::new(super::handler::error_info(e)))
}

/// Sends a subscription's rows until its changelog ends (an error if it fails).
/// `describe`: the simple protocol sends the row description first; the extended one
/// had it from Describe.
pub async fn send_subscription<C>(
    client: &mut C,
    mut subscription: Subscription,
    format: &Format,
    describe: bool,
) -> PgWireResult<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
    let fields = Arc::new(arrow_pg::datatypes::arrow_schema_to_pg_fields(
        &subscription.schema(),
        format,
        Some(options),
    )?);
    if describe {
        let description = RowDescription::new(fields.iter().map(Into::into).collect());
        client
            .send(PgWireBackendMessage::RowDescription(description))
            .await?;
    }
    let mut rows = 0;
    while let Some(batch) = next(client, &mut subscription).await? {
        for row in encode(&fields, batch) {
            client.feed(PgWireBackendMessage::DataRow(row?)).await?;
            rows += 1;
        }
        client.flush().await?;
    }
    Ok(Response::Execution(Tag::new("SUBSCRIBE").with_rows(rows)))
}

/// Sends a subscription's rows as COPY text (tab-separated, `op` first) until its
/// changelog ends.
pub async fn send_copy<C>(client: &mut C, mut subscription: Subscription) -> PgWireResult<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
    let schema = subscription.schema();
    let fields = Arc::new(arrow_pg::datatypes::arrow_schema_to_pg_fields(
        &schema,
        &Format::UnifiedText,
        Some(options),
    )?);
    let columns = schema.fields().len();
    client
        .send(PgWireBackendMessage::CopyOutResponse(CopyOutResponse::new(
            0,
            columns as i16,
            vec![0; columns],
        )))
        .await?;
    let mut rows = 0;
    while let Some(batch) = next(client, &mut subscription).await? {
        for row in encode(&fields, batch) {
            let line = copy_text_line(&row?);
            client
                .feed(PgWireBackendMessage::CopyData(CopyData::new(line.freeze())))
                .await?;
            rows += 1;
        }
        client.flush().await?;
    }
    client
        .send(PgWireBackendMessage::CopyDone(CopyDone::new()))
        .await?;
    Ok(Response::Execution(Tag::new("COPY").with_rows(rows)))
}

/// The subscription's next rows, heartbeating while there are none.
async fn next<C>(
    client: &mut C,
    subscription: &mut Subscription,
) -> PgWireResult<Option<RecordBatch>>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    with_heartbeat(client, subscription.next())
        .await?
        .map_err(user_error)
}

fn encode(
    fields: &Arc<Vec<FieldInfo>>,
    batch: RecordBatch,
) -> impl Iterator<Item = PgWireResult<DataRow>> {
    arrow_pg::datatypes::encode_recordbatch(fields.clone(), batch)
}

/// A text-format data row as a line of COPY's text format: values separated by tabs,
/// `\N` for null, backslash escapes for backslash, tab, newline and carriage return.
fn copy_text_line(row: &DataRow) -> BytesMut {
    let mut data = &row.data[..];
    let mut line = BytesMut::with_capacity(data.len() + 8);
    for i in 0..row.field_count {
        if i > 0 {
            line.put_u8(b'\t');
        }
        let len = data.get_i32();
        if len < 0 {
            line.put_slice(b"\\N");
            continue;
        }
        let (value, rest) = data.split_at(len as usize);
        for &b in value {
            match b {
                b'\\' => line.put_slice(b"\\\\"),
                b'\t' => line.put_slice(b"\\t"),
                b'\n' => line.put_slice(b"\\n"),
                b'\r' => line.put_slice(b"\\r"),
                _ => line.put_u8(b),
            }
        }
        data = rest;
    }
    line.put_u8(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_lines_escape_and_mark_nulls() {
        let mut data = BytesMut::new();
        for value in [Some("+I"), None, Some("a\tb\\c\nd")] {
            match value {
                Some(v) => {
                    data.put_i32(v.len() as i32);
                    data.put_slice(v.as_bytes());
                }
                None => data.put_i32(-1),
            }
        }
        let line = copy_text_line(&DataRow::new(data, 3));
        assert_eq!(&line[..], b"+I\t\\N\ta\\tb\\\\c\\nd\n");
    }
}
