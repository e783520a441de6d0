#!/usr/bin/python3
"""A third-party client of vigil.v1.Query, written with Python's grpcio.

Used by aggregator/tests/grpc_python.rs: the test generates the stubs with grpc_tools.protoc
into a folder passed as --stubs, starts an aggregator, stores data, and runs this script, which
calls ListNodes, Query (instant and range) and Subscribe, and prints JSON lines on stdout:

  {"step": "subscribed"}   once the Subscribe call is live (the test then stores more data)
  {"step": "done", ...}    every result

Errors of a call are reported in its place as {"error": {"code": NAME, "details": TEXT}}.
"""

import argparse
import json
import sys
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True, help="host:port of the aggregator's gRPC port")
    parser.add_argument("--stubs", required=True, help="folder with the generated vigil/v1 stubs")
    parser.add_argument("--token", required=True, help="a reader token")
    parser.add_argument("--bad-token", required=True, help="a token that must be refused")
    parser.add_argument("--instant", required=True, help="PromQL for the instant query")
    parser.add_argument("--time-ms", type=int, required=True)
    parser.add_argument("--histogram", required=True,
                        help="PromQL for an instant query of a histogram series")
    parser.add_argument("--range", required=True, help="PromQL for the range query")
    parser.add_argument("--start-ms", type=int, required=True)
    parser.add_argument("--end-ms", type=int, required=True)
    parser.add_argument("--step-ms", type=int, required=True)
    parser.add_argument("--selector", required=True, help="Subscribe selector")
    parser.add_argument("--expect-points", type=int, required=True,
                        help="Subscribe until this many points arrived")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    sys.path.insert(0, args.stubs)
    import grpc
    from vigil.v1 import query_pb2, query_pb2_grpc

    def emit(obj):
        print(json.dumps(obj), flush=True)

    def labels(pairs):
        return {label.name: label.value for label in pairs}

    def point(p):
        kind = p.WhichOneof("value")
        if kind == "float":
            return {"time_ms": p.time_ms, "float": p.float}
        if kind == "histogram":
            h = p.histogram
            return {"time_ms": p.time_ms, "histogram": {
                "count": h.count, "sum_seconds": h.sum_seconds,
                "buckets": [[b.index, b.upper_seconds, b.count] for b in h.buckets]}}
        return {"time_ms": p.time_ms}

    def series(s):
        return {"labels": labels(s.labels), "points": [point(p) for p in s.points]}

    def response(r):
        out = {"result_type": query_pb2.ResultType.Name(r.result_type),
               "series": [series(s) for s in r.series]}
        if r.HasField("scalar"):
            out["scalar"] = point(r.scalar)
        return out

    def error(e):
        return {"error": {"code": e.code().name, "details": e.details()}}

    def call(fn):
        try:
            return fn()
        except grpc.RpcError as e:
            return error(e)

    auth = [("authorization", "Bearer " + args.token)]
    result = {"step": "done"}
    with grpc.insecure_channel(args.target) as channel:
        stub = query_pb2_grpc.QueryStub(channel)

        result["bad_token"] = call(lambda: stub.ListNodes(
            query_pb2.ListNodesRequest(),
            metadata=[("authorization", "Bearer " + args.bad_token)], timeout=args.timeout))
        result["no_token"] = call(lambda: stub.ListNodes(
            query_pb2.ListNodesRequest(), timeout=args.timeout))

        def nodes():
            reply = stub.ListNodes(query_pb2.ListNodesRequest(), metadata=auth,
                                   timeout=args.timeout)
            return [{
                "node": n.node, "agent_version": n.agent_version,
                "agent_instance": n.agent_instance, "boot_id": n.boot_id,
                "first_seen_ms": n.first_seen_ms, "last_seen_ms": n.last_seen_ms,
                "connected": n.connected, "streams": n.streams, "series": n.series,
                "gpus": [{"index": g.index, "uuid": g.uuid, "model": g.model} for g in n.gpus],
                "model_servers": [{"server": m.server, "comm": m.comm, "pid": m.pid}
                                  for m in n.model_servers],
            } for n in reply.nodes]
        result["nodes"] = call(nodes)

        result["instant"] = call(lambda: response(stub.Query(
            query_pb2.QueryRequest(expr=args.instant, time_ms=args.time_ms),
            metadata=auth, timeout=args.timeout)))
        result["histogram"] = call(lambda: response(stub.Query(
            query_pb2.QueryRequest(expr=args.histogram, time_ms=args.time_ms),
            metadata=auth, timeout=args.timeout)))
        result["range"] = call(lambda: response(stub.Query(
            query_pb2.QueryRequest(expr=args.range, range=query_pb2.QueryRange(
                start_ms=args.start_ms, end_ms=args.end_ms, step_ms=args.step_ms)),
            metadata=auth, timeout=args.timeout)))
        result["bad_query"] = call(lambda: response(stub.Query(
            query_pb2.QueryRequest(expr="sum(", time_ms=args.time_ms),
            metadata=auth, timeout=args.timeout)))

        updates = []
        stream = stub.Subscribe(query_pb2.SubscribeRequest(selectors=[args.selector]),
                                metadata=auth, timeout=args.timeout)
        try:
            # The server answers with headers once the subscription is registered: from then
            # on everything stored reaches this stream.
            stream.initial_metadata()
            emit({"step": "subscribed"})
            points = 0
            deadline = time.monotonic() + args.timeout
            for update in stream:
                kind = update.WhichOneof("body")
                if kind == "data":
                    updates.append({"data": {
                        "node": update.data.node,
                        "series": [series(s) for s in update.data.series]}})
                    points += sum(len(s.points) for s in update.data.series)
                elif kind == "lagged":
                    updates.append({"lagged": update.lagged.dropped_batches})
                if points >= args.expect_points or time.monotonic() > deadline:
                    break
            stream.cancel()
            result["subscribe"] = updates
        except grpc.RpcError as e:
            result["subscribe"] = updates + [error(e)]
    emit(result)


if __name__ == "__main__":
    main()
