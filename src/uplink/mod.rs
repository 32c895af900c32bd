//! (stub, replaced at merge)
use crate::config::UplinkConfig;
use crate::stream::StreamHandle;
use std::path::PathBuf;
use std::sync::Arc;
pub struct UplinkStatus;
impl UplinkStatus {
    pub fn new(_c: &UplinkConfig) -> Self {
        UplinkStatus
    }
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}
pub async fn run(
    _cfg: UplinkConfig,
    _node: String,
    _data_dir: PathBuf,
    _streams: Vec<StreamHandle>,
    _status: Arc<UplinkStatus>,
    _shutdown: smol::channel::Receiver<()>,
) {
}
