use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// A loopback TCP proxy in front of a service that can turn into a black hole: it then
/// drops the connections it forwards and accepts new ones without ever answering, as a
/// host that vanished from the network would, until [`FaultProxy::restore`].
pub struct FaultProxy {
    pub port: u16,
    /// (black hole, epoch): a forwarded connection ends when the epoch moves on.
    state: watch::Sender<(bool, u64)>,
}

/// Connections one proxy accepts at most (reconnect loops stay bounded).
const MAX_CONNECTIONS: usize = 5_000;
/// The longest a black-holed connection is held open.
const MAX_HOLD: Duration = Duration::from_secs(300);

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (state, state_rx) = watch::channel((false, 0u64));
        tokio::spawn(async move {
            for _ in 0..MAX_CONNECTIONS {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut state = state_rx.clone();
                let (black_hole, epoch) = *state.borrow_and_update();
                if black_hole {
                    tokio::spawn(async move {
                        // Hold the socket and answer nothing until the proxy is restored.
                        let mut sink = [0u8; 1024];
                        let _ = tokio::time::timeout(MAX_HOLD, async {
                            tokio::select! {
                                _ = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} } => {}
                                _ = state.wait_for(|(hole, _)| !hole) => {}
                            }
                        })
                        .await;
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = state.wait_for(|(_, now)| *now != epoch) => {}
                    }
                });
            }
        });
        FaultProxy { port, state }
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Cuts every forwarded connection; new ones are accepted and never answered.
    pub fn vanish(&self) {
        self.state.send_modify(|(hole, epoch)| {
            *hole = true;
            *epoch += 1;
        });
    }

    /// Forwards new connections again (and closes the held ones, so clients retry).
    pub fn restore(&self) {
        self.state.send_modify(|(hole, _)| *hole = false);
    }
}
