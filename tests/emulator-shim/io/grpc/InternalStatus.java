// A drop-in for io.grpc.InternalStatus in Google's Pub/Sub emulator (0.8.20, in Google Cloud
// SDK 528). The emulator's all-in-one jar bundles a grpc-netty that calls
// InternalStatus.asRuntimeException(Status, Metadata, boolean), which its bundled grpc-api
// lacks. Every closed streaming pull then throws NoSuchMethodError in onRstStreamRead and the
// emulator never forgets the dead stream: it keeps sending messages to it, so a killed
// subscriber's messages are not redelivered to live ones. Put first on the classpath, this
// class supplies the missing method; nothing else changes.
package io.grpc;

public final class InternalStatus {
  private InternalStatus() {}

  public static final Metadata.Key<String> MESSAGE_KEY = Status.MESSAGE_KEY;
  public static final Metadata.Key<Status> CODE_KEY = Status.CODE_KEY;

  public static StatusRuntimeException asRuntimeExceptionWithoutStacktrace(
      Status status, Metadata trailers) {
    return asRuntimeException(status, trailers, false);
  }

  public static StatusRuntimeException asRuntimeException(
      Status status, Metadata trailers, boolean fillInStackTrace) {
    StatusRuntimeException e = new StatusRuntimeException(status, trailers);
    if (!fillInStackTrace) {
      e.setStackTrace(new StackTraceElement[0]);
    }
    return e;
  }
}
